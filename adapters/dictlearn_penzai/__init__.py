"""dictlearn_penzai: Gemma 3 in penzai, with named sites and dictionary hooks."""

from dictlearn_penzai.hookpoint import HookPoint
