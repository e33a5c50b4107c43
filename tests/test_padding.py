"""The pad-token fallback, defined once: eos for tokenizers without a pad token, else id 0 for batches."""

from conftest import build_tokenizer
from deltatune.padding import ensure_pad_token, padding_id


def tokenizer_without_padding(eos: str | None):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "</s>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]")), unk_token="[UNK]", eos_token=eos
    )


def test_decoders_pad_with_eos_and_batches_fall_back_to_id_0():
    tokenizer = build_tokenizer()  # has its own pad token: kept
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "[PAD]" and padding_id(tokenizer) == 0

    decoder = tokenizer_without_padding(eos="</s>")
    assert decoder.pad_token is None
    ensure_pad_token(decoder)
    assert decoder.pad_token == "</s>" and padding_id(decoder) == 2

    bare = tokenizer_without_padding(eos=None)
    ensure_pad_token(bare)
    assert bare.pad_token is None and bare.pad_token_id is None and padding_id(bare) == 0
