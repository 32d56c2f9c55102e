"""Query a running `haq serve` / `vllm serve CKPT --quantization haq` server with the OpenAI client.

    haq serve CKPT --host 127.0.0.1 --port 8000 &          # CPU build (`vllm serve` is broken there)
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 "The capital of France is"

The server speaks the OpenAI API, so any OpenAI client works; this one uses the
`openai` package (a vLLM dependency). `--chat` sends a chat request instead of a
plain completion (the model's tokenizer needs a chat template).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="+", help="one or more prompts")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    ap.add_argument("--model", default=None, help="served model name (default: the server's first model)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--chat", action="store_true", help="chat completions instead of completions")
    args = ap.parse_args(argv)

    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key="unused")  # vLLM checks no key unless started with --api-key
    model = args.model or client.models.list().data[0].id
    for prompt in args.prompt:
        if args.chat:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=args.max_tokens, temperature=0.0)
            text = r.choices[0].message.content
        else:
            r = client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0.0)
            text = r.choices[0].text
        print(f"{prompt!r} -> {text!r} ({r.usage.completion_tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
