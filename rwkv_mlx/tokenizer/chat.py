"""The RWKV World chat format.

A conversation is written as one paragraph per message, each a role name, a
colon, a space and the message, followed by a blank line::

    System: You are a helpful assistant.

    User: What is the capital of France?

    Assistant: Paris.

    User: And of Italy?

    Assistant:

The prompt for a reply ends with ``Assistant:`` and no space, because World
tokens for words carry their leading space. Because a blank line ends a
message, blank lines inside a message are removed and the message is
stripped of surrounding whitespace. ``\\r\\n`` becomes ``\\n`` first.

``format_world_chat`` implements the format in Python and
``WORLD_CHAT_TEMPLATE`` as a Jinja chat template for ``tokenizer_config.json``;
the tests check that both give the same text.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .errors import TokenizerError

WORLD_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

WORLD_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set name = 'System' -%}"
    "{%- elif message['role'] == 'user' -%}{%- set name = 'User' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set name = 'Assistant' -%}"
    "{%- else -%}{{- raise_exception('the World chat format has the roles system, user and assistant, not '"
    " ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- set lines = message['content'].replace('\\r\\n', '\\n').split('\\n') | reject('equalto', '') -%}"
    "{{- name ~ ': ' ~ (lines | join('\\n') | trim) ~ '\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def format_world_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Write a conversation in the World chat format.

    Args:
        messages: Dicts with a ``"role"`` (system, user or assistant) and a
            ``"content"`` string.
        add_generation_prompt: End with ``Assistant:`` for the model's reply.

    Returns:
        The conversation as text.

    Raises:
        TokenizerError: If a message has another role, or content that is
            not a string.
    """
    parts = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in WORLD_ROLE_NAMES:
            raise TokenizerError(
                f"message {index} has the role {role!r}; the World chat format has the roles system, user "
                "and assistant"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise TokenizerError(
                f"message {index} has content of type {type(content).__name__}; the World chat format "
                "needs a string"
            )
        lines = [line for line in content.replace("\r\n", "\n").split("\n") if line]
        parts.append(f"{WORLD_ROLE_NAMES[role]}: {chr(10).join(lines).strip()}\n\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def render_jinja_chat_template(
    template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **variables: Any
) -> str:
    """Render a Hugging Face style Jinja chat template.

    The environment matches what transformers uses: a sandbox, ``trim_blocks``
    and ``lstrip_blocks``, and a ``raise_exception`` function.

    Args:
        template: The Jinja source.
        messages: The conversation.
        add_generation_prompt: Passed to the template.
        **variables: Further template variables, such as ``bos_token``.

    Returns:
        The rendered text.

    Raises:
        TokenizerError: If the template raises or cannot be compiled.
    """
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError("rendering a chat template needs jinja2; install it with pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"the chat template rejected the messages: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        compiled = environment.from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as error:
        raise TokenizerError(f"the chat template failed: {error}") from None
