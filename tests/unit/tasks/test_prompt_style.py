"""Prompt styles: auto picks chat only with a chat template; completion text keeps spans exact."""
import pytest

from dynheads.errors import ConfigError
from dynheads.tasks.base import PromptFormat, Sample, encode, resolve_prompt_style
from dynheads.tasks.niah import NIAH_COMPLETION


class _Tok:
    chat_template = None


def test_auto_follows_the_chat_template():
    assert resolve_prompt_style(_Tok(), "auto") == "completion"
    templ = _Tok()
    templ.chat_template = "{{ messages }}"
    assert resolve_prompt_style(templ, "auto") == "chat" and resolve_prompt_style(templ, "completion") == "completion"
    with pytest.raises(ConfigError, match="no chat template"):
        resolve_prompt_style(_Tok(), "chat")
    with pytest.raises(ConfigError, match="unknown --prompt-style 'plain'"):
        resolve_prompt_style(_Tok(), "plain")


def test_completion_prompt_on_the_default_tokenizer_keeps_spans_exact():
    from dynheads.models import load_tokenizer

    tok = load_tokenizer("default")
    context = "Some text before. The magic word is 1234-abcd. Some text after."
    needle = "The magic word is 1234-abcd."
    at = context.index(needle)
    enc = encode(Sample("s", context, "What is the magic word?", "1234-abcd", {"needle": [(at, at + len(needle))]},
                        NIAH_COMPLETION), tok)
    assert enc.prompt_text == context + "\n\nQuestion: What is the magic word?\nAnswer:"
    s, e = enc.token_spans["needle"][0]
    assert tok.decode(enc.input_ids[s:e]).strip() == needle
    chat = encode(Sample("s", context, "q", "a", {"needle": [(at, at + len(needle))]}, PromptFormat(None, "{context}")),
                  tok)
    assert chat.prompt_text.startswith("<|im_start|>")  # the default model keeps its chat template
