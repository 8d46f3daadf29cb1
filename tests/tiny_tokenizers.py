"""Tiny word-level tokenizers built offline (no download): Llama-like (BOS, eos, chat template) and BERT-like."""

from __future__ import annotations

WORDS = ("hello world what is two plus three four five six seven the answer yes no good bad movie great awful "
         "sentence label question alpha beta gamma delta a b c d e f g h i j k l m n o p q r s t u v w x y z").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _tokenizer(specials: list[str], single: str | None, pair: str | None = None, **named):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    if single:
        st = [(s, vocab[s]) for s in specials if s in single + (pair or "")]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair or single + " $B", special_tokens=st)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def llama_tok():
    """BOS added by default (like Llama/Mistral), an eos, a pad and a chat template."""
    tok = _tokenizer(["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<s> $A",
                     bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def bert_tok():
    """[CLS] text [SEP] (text [SEP]), token type ids, no bos/eos, no chat template (like MiniLM)."""
    return _tokenizer(["[PAD]", "<unk>", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1",
                      cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="<unk>",
                      model_input_names=["input_ids", "token_type_ids", "attention_mask"])
