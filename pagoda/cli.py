"""`pagoda serve | generate | chat`: the command line.

Engine options are generated from EngineConfig's fields, so the CLI, `LLM(**kwargs)`
and the server share one set of names. Any PagodaError ends the command with one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

from pagoda.config import EngineConfig, option_specs
from pagoda.errors import PagodaError
from pagoda.server.reasoning_parsers import REASONING_PARSERS
from pagoda.server.replicas import ROUTER_POLICIES
from pagoda.server.tool_parsers import TOOL_PARSERS

if TYPE_CHECKING:
    from pagoda.engine.llm import LLM


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for name, annotation, default, meta in option_specs():
        flags = ["--" + name.replace("_", "-"), *meta.get("aliases", ())]
        if annotation == "bool":
            group.add_argument(*flags, dest=name, action="store_true", help=meta["help"])
            continue
        if meta.get("nargs"):  # list-valued: --lora-modules a=x b=y
            group.add_argument(*flags, dest=name, nargs=meta["nargs"], default=list(default), metavar="VALUE",
                               help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(str(annotation).split(" ")[0], str)
        group.add_argument(*flags, dest=name, type=kind, default=default, choices=meta.get("choices"), help=meta["help"])


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name) for name, *_ in option_specs()})


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--request-seed", type=int, default=None, help="seed of this request's sampling")


def _sampling_params(args: argparse.Namespace):
    from pagoda.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.request_seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="A fast, portable LLM serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible API (and a web chat at /)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("PAGODA_API_KEY"), help="or PAGODA_API_KEY")
    serve.add_argument("--served-model-name", default=None, help="the model name clients send")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM")
    serve.add_argument("--tool-call-parser", default="hermes", choices=sorted(TOOL_PARSERS),
                       help="the format the model writes tool calls in (hermes: Hermes/Qwen <tool_call> JSON)")
    serve.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                       help="split the model's <think>...</think> into reasoning_content (default: off)")
    serve.add_argument("--pooling", default="last", choices=["last", "mean"],
                       help="/v1/embeddings: the final hidden state of the last token, or the mean over the input")
    dp = serve.add_argument_group("data parallel (replicas behind sglang-router)")
    dp.add_argument("--data-parallel-size", "--dp", dest="data_parallel_size", type=int, default=1,
                    help="replicas of the model, each a server on an internal loopback port, behind "
                         "sglang-router on --host/--port (on CPU each gets its own NUMA node or group of cores)")
    dp.add_argument("--router-policy", default="cache_aware", choices=ROUTER_POLICIES,
                    help="how the router picks a replica: cache_aware sends requests that share a prefix "
                         "to the replica holding it (shortest queue when unbalanced)")
    dp.add_argument("--router-health-check-interval", type=int, default=5,
                    help="seconds between the router's health checks of each replica")
    dp.add_argument("--router-args", default=None,
                    help="more sglang_router.launch_router flags, passed through verbatim, "
                         "e.g. '--cache-threshold 0.5 --retry-max-retries 3'")
    _add_engine_options(serve)

    gen = sub.add_parser("generate", help="stream one completion to stdout")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    _add_sampling_options(gen)
    _add_engine_options(gen)

    chat = sub.add_parser("chat", help="chat in the terminal (/reset clears, /exit or Ctrl-D quits)")
    chat.add_argument("--system", default=None, help="a system prompt")
    _add_sampling_options(chat)
    _add_engine_options(chat)
    return parser


def _llm(args: argparse.Namespace) -> "LLM":
    from pagoda.engine.llm import LLM

    return LLM(config=_engine_config(args), show_progress=sys.stderr.isatty())


def _stream(llm: "LLM", prompt: Any, params) -> Iterator[str]:
    """Run one request and yield its text as it settles."""
    for output in llm.stream(prompt, params):
        yield output.outputs[0].delta_text


def _generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _llm(args)
    prompt: Any = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    start, first = time.perf_counter(), None
    for piece in _stream(llm, prompt, params):
        first = first or time.perf_counter()
        sys.stdout.write(piece)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    tokens = llm.stats().generation_tokens
    sys.stdout.write("\n")
    decode = (tokens - 1) / (time.perf_counter() - first) if first and tokens > 1 else 0.0
    print(f"[{tokens} tokens in {elapsed:.2f}s, first token {((first or start) - start) * 1000:.0f} ms, "
          f"decode {decode:.1f} tok/s]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    llm = _llm(args)
    if not llm.model_info.has_chat_template:
        raise PagodaError("this model has no chat template; use `pagoda generate` instead")
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("pagoda chat — /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for piece in _stream(llm, llm.tokenizer.encode_chat(history), params):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def _serve(args: argparse.Namespace) -> int:
    if args.node_rank > 0:  # a node of a multi-node tensor-parallel group: worker ranks only
        from pagoda.distributed.worker import serve_node

        return serve_node(_engine_config(args))
    if args.data_parallel_size != 1:
        return _serve_replicas(args)
    from pagoda.server.launch import serve

    serve(
        _engine_config(args), host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name, shutdown_timeout=args.shutdown_timeout,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser, pooling=args.pooling,
    )
    return 0


def _serve_replicas(args: argparse.Namespace) -> int:
    from pagoda.server.launch import setup_logging
    from pagoda.server.replicas import ReplicaSet, router_options

    setup_logging()
    serve_flags = ["--shutdown-timeout", str(args.shutdown_timeout), "--tool-call-parser", args.tool_call_parser]
    if args.reasoning_parser:
        serve_flags += ["--reasoning-parser", args.reasoning_parser]
    if args.served_model_name:
        serve_flags += ["--served-model-name", args.served_model_name]
    replicas = ReplicaSet(
        _engine_config(args), serve_flags, args.data_parallel_size, args.host, args.port,
        router_options(args.router_policy, args.router_health_check_interval, args.router_args),
        api_key=args.api_key, shutdown_timeout=args.shutdown_timeout, served_model_name=args.served_model_name,
    )
    return replicas.run()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return {"serve": _serve, "generate": _generate, "chat": _chat}[args.command](args)
    except PagodaError as e:
        print(f"pagoda: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
