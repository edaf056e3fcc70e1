"""The perplexity of a long document, offline on a `vllm.LLM` and through the server's rolling
scope; both cut the text into lm-evaluation-harness's rolling windows.

    python examples/perplexity.py MODEL_PATH [--base-url http://127.0.0.1:8000/v1] [--file F]
"""

import argparse
import math
import os

if __name__ == "__main__":  # vLLM starts its engine with spawn
    import openai
    from vllm import LLM

    import vllm_loglik
    from vllm_loglik.testing import default_corpus

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_path")
    parser.add_argument("--file", help="the document (default: the demo corpus)")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    args = parser.parse_args()
    text = open(args.file, encoding="utf-8").read() if args.file else default_corpus()

    llm = LLM(args.model_path, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    [doc] = vllm_loglik.loglikelihood_rolling(llm, [text])
    bits_per_byte = -doc.logprob / math.log(2) / len(text.encode("utf-8"))
    print(f"offline: {doc.num_tokens} tokens, perplexity {doc.perplexity:.2f}, "
          f"{bits_per_byte:.3f} bits per byte")
    llm.llm_engine.engine_core.shutdown()

    client = openai.OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"))
    model = client.models.list().data[0].id
    response = client.completions.create(
        model=model, prompt=text, max_tokens=0,
        extra_body={"loglikelihood": {"scope": "rolling", "content": False}},
    )  # fmt: skip
    (entry,) = response.choices[0].loglikelihood
    print(f"server:  {entry['num_tokens']} tokens, perplexity "
          f"{math.exp(-entry['logprob'] / entry['num_tokens']):.2f} (its windows follow its own "
          "max_model_len)")
