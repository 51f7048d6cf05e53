"""Prompt templates for instruction records ``{instruction, input, output}``.

Three templates, chosen by name:

- ``"medalpaca"``: the study's template, medAlpaca's ``medalpaca.json`` (kbressem/medAlpaca,
  ``medalpaca/legacy/prompt_templates/medalpaca.json``, used by ``medalpaca/handler.py``'s
  ``DataHandler.generate_prompt``): primer, then ``### Instruction:``, ``### Input:`` and
  ``### Response:`` sections, each preceded by a blank line. Unlike Alpaca, the Input section
  is always written, even when the input is empty. Text:
  ``"Below is an instruction that describes a task, paired with an input that provides further
  context. Write a response that appropriately completes the request.\\n\\n### Instruction:\\n
  {instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{output}"``.
- ``"alpaca"``: Stanford Alpaca's two prompts (with and without input), the same text as
  torchtune's :class:`~torchtune.data.AlpacaToMessages`; the study's MedQuAD generations were
  prompted with its no-input form.
- ``"llama3_chat"``: no prompt text; a user turn (instruction, then the input after a blank line)
  and an assistant turn, with an optional system prompt, rendered by the tokenizer's own chat
  format (Llama 3 headers and ``<|eot_id|>``).

The two text templates are whole prompts for a base model, so :class:`PlainTextTokenizer`
tokenizes them as plain text (BOS, prompt, response, EOS) rather than inside chat headers; that
is what the study trained on. ``llama3_chat`` goes through the tokenizer unchanged.
"""

from typing import Any, Dict, List, Mapping, Optional

from torchtune.data import Message
from torchtune.data._utils import truncate
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

TEMPLATES = ("medalpaca", "alpaca", "llama3_chat")
TEXT_TEMPLATES = ("medalpaca", "alpaca")

MEDALPACA_PRIMER = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
MEDALPACA_PROMPT = (
    MEDALPACA_PRIMER + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = MEDALPACA_PROMPT  # Alpaca's with-input prompt is the same text
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

FIELDS = ("instruction", "input", "output")


def check_template(template: str) -> str:
    """Return ``template`` if it names a known template, else raise ``ValueError`` listing them."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    return template


def format_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt text of a text template (everything before the response)."""
    if template == "medalpaca":
        return MEDALPACA_PROMPT.format(instruction=instruction, input=input)
    if template == "alpaca":
        if input:
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    raise ValueError(f"{template!r} is not a text template; expected one of {TEXT_TEMPLATES}")


def chat_user_text(instruction: str, input: str = "") -> str:
    """The user turn of ``llama3_chat``: the instruction, then the input after a blank line."""
    return f"{instruction}\n\n{input}" if input else instruction


class InstructToMessages(Transform):
    """Turn ``{instruction, input, output}`` into torchtune Messages under a named template.

    Args:
        template (str): ``"medalpaca"``, ``"alpaca"`` or ``"llama3_chat"``. Default ``"medalpaca"``.
        train_on_input (bool): whether the prompt (user turn) counts in the loss. Default True,
            as in the study (its ``train_on_inputs`` flag was always on).
        column_map (Optional[Dict[str, str]]): maps ``instruction``/``input``/``output`` to the
            dataset's column names. A missing or None input is treated as empty.
        system_prompt (Optional[str]): a system turn for ``llama3_chat`` (always masked).
    """

    def __init__(
        self,
        template: str = "medalpaca",
        train_on_input: bool = True,
        column_map: Optional[Dict[str, str]] = None,
        system_prompt: Optional[str] = None,
    ):
        self.template = check_template(template)
        if system_prompt is not None and template != "llama3_chat":
            raise ValueError("system_prompt only applies to template='llama3_chat'")
        self.train_on_input = train_on_input
        self.column_map = {field: field for field in FIELDS}
        self.column_map.update(column_map or {})
        self.system_prompt = system_prompt

    def __call__(self, sample: Mapping[str, Any]) -> Mapping[str, Any]:
        instruction = sample[self.column_map["instruction"]] or ""
        input = sample.get(self.column_map["input"]) or ""
        output = sample[self.column_map["output"]]
        if self.template == "llama3_chat":
            prompt = chat_user_text(instruction, input)
        else:
            prompt = format_prompt(self.template, instruction, input)
        messages = [
            Message(role="user", content=prompt, masked=not self.train_on_input),
            Message(role="assistant", content=output, masked=False),
        ]
        if self.system_prompt is not None:
            messages.insert(0, Message(role="system", content=self.system_prompt, masked=True))
        return {"messages": messages}


class PlainTextTokenizer(Transform):
    """Model transform that tokenizes messages as plain text: BOS, each message's text, EOS.

    No chat headers and no stripping, so ``prompt + response`` is exactly the training text of
    a base-model template. BOS is masked; EOS is trained (unmasked) so the model learns to stop.
    Truncates to ``tokenizer.max_seq_len``, ending in EOS as torchtune's tokenizers do.

    Args:
        tokenizer (ModelTokenizer): a torchtune tokenizer with ``encode``, ``bos_id``, ``eos_id``.
    """

    def __init__(self, tokenizer: ModelTokenizer):
        self.tokenizer = tokenizer

    @property
    def max_seq_len(self) -> Optional[int]:
        return self.tokenizer.max_seq_len

    def tokenize_messages(self, messages: List[Message], *, add_end_tokens: bool = True):
        tokens, mask = [self.tokenizer.bos_id], [True]
        for message in messages:
            ids = self.tokenizer.encode(message.text_content, add_bos=False, add_eos=False)
            tokens += ids
            mask += [message.masked] * len(ids)
        if add_end_tokens:
            tokens.append(self.tokenizer.eos_id)
            mask.append(False)
        if self.max_seq_len:
            eos = self.tokenizer.eos_id if add_end_tokens else None
            tokens = truncate(tokens, self.max_seq_len, eos)
            mask = truncate(mask, self.max_seq_len, False if add_end_tokens else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        messages = sample.pop("messages")
        sample["tokens"], sample["mask"] = self.tokenize_messages(
            messages, add_end_tokens=not inference
        )
        return sample


def model_transform_for(template: str, tokenizer: ModelTokenizer) -> Transform:
    """The tokenizer for text templates wrapped in `PlainTextTokenizer`; for chat, unchanged."""
    return PlainTextTokenizer(tokenizer) if template in TEXT_TEMPLATES else tokenizer


def render_example(template: str, record: Mapping[str, Any], system_prompt: Optional[str] = None) -> Dict[str, Any]:
    """One record as text, for export: ``{prompt, response}`` for text templates, or
    ``{messages: [{role, content}]}`` for ``llama3_chat``."""
    instruction, input, output = record["instruction"], record.get("input") or "", record["output"]
    if check_template(template) in TEXT_TEMPLATES:
        return {"prompt": format_prompt(template, instruction, input), "response": output}
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [
        {"role": "user", "content": chat_user_text(instruction, input)},
        {"role": "assistant", "content": output},
    ]
    return {"messages": messages}
