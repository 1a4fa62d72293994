"""The World chat format, in Python and as a Jinja template."""

from __future__ import annotations

import json

import pytest

from rwkv_mlx.tokenizer import WORLD_CHAT_TEMPLATE, TokenizerError, format_world_chat, load_tokenizer
from rwkv_mlx.tokenizer.chat import render_jinja_chat_template

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]

MESSY = [
    {"role": "user", "content": "  first line\r\n\r\n\r\nsecond line\n\n\nthird\n  \nfourth  \n\n"},
    {"role": "assistant", "content": "\n\nanswer\n"},
]


def test_world_chat_prompt_for_reply():
    assert format_world_chat(CONVERSATION) == (
        "System: You are a helpful assistant.\n\n"
        "User: What is the capital of France?\n\n"
        "Assistant: Paris.\n\n"
        "User: And of Italy?\n\n"
        "Assistant:"
    )


def test_world_chat_without_generation_prompt():
    assert format_world_chat(CONVERSATION[:3], add_generation_prompt=False) == (
        "System: You are a helpful assistant.\n\nUser: What is the capital of France?\n\nAssistant: Paris.\n\n"
    )


def test_world_chat_collapses_blank_lines_and_strips():
    assert format_world_chat(MESSY, add_generation_prompt=False) == (
        "User: first line\nsecond line\nthird\n  \nfourth\n\nAssistant: answer\n\n"
    )


def test_world_chat_empty_conversation():
    assert format_world_chat([]) == "Assistant:"
    assert format_world_chat([], add_generation_prompt=False) == ""


def test_world_chat_rejects_unknown_role():
    with pytest.raises(TokenizerError, match="message 1 has the role 'tool'"):
        format_world_chat([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])


def test_world_chat_rejects_non_string_content():
    with pytest.raises(TokenizerError, match="message 0 has content of type list"):
        format_world_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


@pytest.mark.parametrize("messages", [CONVERSATION, MESSY, []])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_jinja_template_matches_python(messages, add_generation_prompt):
    rendered = render_jinja_chat_template(WORLD_CHAT_TEMPLATE, messages, add_generation_prompt)
    assert rendered == format_world_chat(messages, add_generation_prompt)


def test_jinja_template_rejects_unknown_role():
    with pytest.raises(TokenizerError, match="not tool"):
        render_jinja_chat_template(WORLD_CHAT_TEMPLATE, [{"role": "tool", "content": "x"}])


def test_world_apply_chat_template_tokenizes(world):
    ids = world.apply_chat_template(CONVERSATION)
    assert ids == world.encode(format_world_chat(CONVERSATION))
    assert world.decode(ids).endswith("Assistant:")
    text = world.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False, return_dict=False)
    assert text == format_world_chat(CONVERSATION, add_generation_prompt=False)


def test_world_apply_custom_template(world):
    from rwkv_mlx.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("world")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False) == (
        "<system>You are a helpful assistant.<user>What is the capital of France?"
    )
    # Other tokenizer objects keep the World template.
    assert world.chat_template == WORLD_CHAT_TEMPLATE


def test_byte_tokenizer_has_no_chat_template(byte_tokenizer):
    assert byte_tokenizer.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        byte_tokenizer.apply_chat_template(CONVERSATION)


def test_saved_byte_tokenizer_keeps_added_template(byte_tokenizer, tmp_path):
    byte_tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    config_path.write_text(json.dumps(config))

    tokenizer = load_tokenizer(str(tmp_path))

    assert tokenizer.vocab_size == 256
    assert tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False) == "<system>You are a helpful assistant."
