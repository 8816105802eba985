#!/usr/bin/env python3
"""The demo's last leg: one chat request through a real gateway. memory-service and a
runtime-service on loopback, the Shepherd Model Gateway (smg) in front, and the official openai
client streaming a reply token by token, as any OpenAI application would see it.

Usage: gateway_demo.py MEMORY_SERVICE RUNTIME_SERVICE   (scripts/demo runs it when scripts/tools.sh
has installed the gateway)
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from smg_gateway import MODEL, WITHIN_S, Gateway  # noqa: E402
from walkthrough import start_server, stop_servers, wait_serving  # noqa: E402


def main():
    import openai

    memory_bin, runtime_bin = sys.argv[1:3]
    servers, gateway = [], None
    # The services' logs stay out of the way: the terminal shows the reply.
    try:
        servers.append(start_server([memory_bin], quiet=True))
        servers.append(start_server([runtime_bin, "--memory-addr", f"http://{servers[0][1]}"], quiet=True))
        wait_serving(servers[1][1])
        url = f"grpc://{servers[1][1]}"
        gateway = Gateway(workers=[url], log_name="smg-demo")
        gateway.wait_workers([url])
        print(f"\n▶ through a real gateway: openai client → smg (HTTP {gateway.url}) → runtime-service "
              f"({url}, vLLM's gRPC dialect)")
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                               timeout=WITHIN_S)
        question = "Why do inference engines batch requests?"
        print(f"  user: {question}\n  assistant: ", end="", flush=True)
        start, first, last, usage = time.monotonic(), None, None, None
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=32, seed=11,
            stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.monotonic()
                first = first or last
                print(chunk.choices[0].delta.content, end="", flush=True)
            if chunk.usage:
                usage = chunk.usage
        print()
        if first and usage and usage.completion_tokens > 1:
            itl = (last - first) / (usage.completion_tokens - 1)
            print(f"  {usage.prompt_tokens} prompt tokens (the gateway applied the chat template and "
                  f"tokenized with the runtime's own tokenizer), {usage.completion_tokens} generated; "
                  f"TTFT {(first - start) * 1000:.1f} ms, ITL {itl * 1000:.2f} ms at the client")
    finally:
        if gateway:
            gateway.stop()
        stop_servers(servers)


if __name__ == "__main__":
    main()
