"""The Gemma 3 tokenizer rebuilt from GGUF metadata: ids equal transformers' on every reference
case (prose, code and runs of spaces, HTML, other scripts, emoji, chat markup), round trips,
chat formatting, errors."""

import json
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dictlearn_gemma.tokenizer import Tokenizer, format_chat, special_ids

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def tokenizer(gemma3_270m_params):
  return gemma3_270m_params[1]


def _cases():
  path = FIXTURES / "gemma3_270m_reference.json"
  if not path.is_file():
    pytest.skip("reference fixtures not generated")
  return json.loads(path.read_text())["tokenizer_cases"]


def test_ids_equal_transformers_on_every_reference_case(tokenizer):
  cases = _cases()
  assert len(cases) >= 20
  wrong = [(c["text"], tokenizer.encode(c["text"], add_bos=False), c["ids"]) for c in cases
           if tokenizer.encode(c["text"], add_bos=False) != c["ids"]]
  assert not wrong
  for case in cases:
    assert tokenizer.decode(case["ids"]) == case["text"]


def test_runs_of_spaces_are_single_pieces(tokenizer):
  """DESIGN's trap: "    if" is the 4-space piece (id 140) then "if", not four "▁"."""
  assert tokenizer.encode("    if", add_bos=False) == [140, tokenizer.piece_to_id("if")]
  assert tokenizer.split("a  b") == ["a", "\u2581\u2581", "b"]
  assert tokenizer.encode("<table>", add_bos=False) == [168]


def test_special_tokens_and_chat_format(tokenizer):
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 1, 0)
  assert (tokenizer.start_of_turn_id, tokenizer.end_of_turn_id) == (105, 106)
  text = tokenizer.apply_chat_template("Hi there")
  assert text == "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
  ids = tokenizer.encode_chat("Hi there")
  assert ids[:2] == [2, 105] and ids[-3:] == [105, tokenizer.piece_to_id("model"), 107]
  assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi there\nmodel\n"
  conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
  assert format_chat(conversation) == (
      "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
      "<start_of_turn>model\nHello.<end_of_turn>\n"
      "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
  with pytest.raises(ValueError, match="chat role 'robot'"):
    format_chat([{"role": "robot", "content": "x"}])
  assert special_ids(tokenizer)["end_of_turn_id"] == 106
  assert special_ids(object()) == special_ids(tokenizer)  # Gemma 3 defaults.


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_decode_inverts_encode(tokenizer, text):
  ids = tokenizer.encode(text, add_bos=False)
  assert tokenizer.decode(ids) == text
  assert [tokenizer.piece_to_id(p) for p in tokenizer.split(text)] == ids


def test_batch_encode_and_save_round_trip(tokenizer, tmp_path):
  texts = ["def f(x):\n    return x", "naïve café 🍕"]
  assert tokenizer.encode(texts) == [tokenizer.encode(t) for t in texts]
  tokenizer.save(tmp_path / "tokenizer.model")
  again = Tokenizer.from_file(tmp_path / "tokenizer.model")
  assert again.encode(texts, add_bos=False) == tokenizer.encode(texts, add_bos=False)
  assert len(again) == 262144


def test_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no SentencePiece model"):
    Tokenizer.from_file(tmp_path / "missing.model")
  (tmp_path / "bad.model").write_bytes(b"\x00\xff not a protobuf \xff")
  with pytest.raises(ValueError, match="not a SentencePiece model file"):
    Tokenizer.from_file(tmp_path / "bad.model")
  with pytest.raises(ValueError, match="differ in length"):
    Tokenizer.from_vocabulary(["a", "b"], [0.0], [1, 1])
