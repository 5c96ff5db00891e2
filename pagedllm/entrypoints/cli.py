"""`pagedllm` command line: generate, chat, plan, serve, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pagedllm.benchmarks.cli import add_bench_parser
from pagedllm.distributed.parallel_state import launched_by_torchrun
from pagedllm.engine.factory import create_engine
from pagedllm.entrypoints.cli_args import (
    add_engine_args,
    add_sampling_args,
    add_serve_args,
    engine_args_from,
    sampling_params_from,
)
from pagedllm.entrypoints.plan import add_plan_parser
from pagedllm.executor.multiproc import run_torchrun_worker


def _engine(ns: argparse.Namespace):
    return create_engine(engine_args_from(ns))


def _run(engine, prompt, params):
    """Run one request to the end; with one sample, print its text as it is produced."""
    rid = engine.add_request(prompt, params)
    printed, final = 0, None
    while final is None:
        for out in engine.step():
            if out.request_id != rid:
                continue
            if out.error:
                raise RuntimeError(out.error)
            if params.n == 1:
                sys.stdout.write(out.outputs[0].text[printed:])
                sys.stdout.flush()
                printed = len(out.outputs[0].text)
            if out.finished:
                final = out
    if params.n == 1:
        sys.stdout.write("\n")
    return final


def cmd_generate(ns: argparse.Namespace) -> None:
    params = sampling_params_from(ns)
    out = _run(_engine(ns), ns.prompt, params)
    if params.n > 1:
        for c in out.outputs:
            print(f"--- sample {c.index} ({c.finish_reason}) ---\n{c.text}")


def cmd_chat(ns: argparse.Namespace) -> None:
    params = sampling_params_from(ns)
    engine = _engine(ns)
    messages = [{"role": "system", "content": ns.system}] if ns.system else []
    print("pagedllm chat: type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        out = _run(engine, engine.processor.chat_prompt(messages), params)
        messages.append({"role": "assistant", "content": out.outputs[0].text})


def cmd_serve(ns: argparse.Namespace) -> None:
    from pagedllm.entrypoints.openai.api_server import cmd_serve as serve  # the server's libraries only when serving

    serve(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="LLM inference and serving with a paged KV cache")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, streaming the text")
    gen.add_argument("prompt")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat through the model's chat template")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)

    add_plan_parser(sub)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if launched_by_torchrun() and int(os.environ["RANK"]) > 0 and hasattr(ns, "tensor_parallel_size"):
            if ns.command == "serve":
                ns.model = ns.model_tag or ns.model
            # rank 0 runs the command; the others serve its steps
            run_torchrun_worker(engine_args_from(ns).create_engine_config())
            return 0
        ns.func(ns)
    except ValueError as exc:  # user mistakes: one line, exit 2
        print(f"pagedllm {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
