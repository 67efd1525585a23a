"""The text encoder's CUDA graphs (app/runtime/encoder_graph.py) against its eager forward on a GPU: the
embeddings diffusers' encode_prompt returns must be identical, for one prompt and for two at once,
a kept result must survive later replays, and the times are printed side by side.

    python -m ops.lab.encoder_graph_check --model-dir /tmp/zimage-full

Exits 1 when the graphs differ from eager or did not serve. GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PROMPT_SETS = (
    ["a red fox in the snow"],
    ["a lighthouse at dusk, oil painting", "a bowl of ramen, studio photo"],
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", required=True)
    args = parser.parse_args(argv)
    import torch

    from app.config import load_settings
    from app.runtime import encoder_graph
    from app.runtime.loader import load_pipeline

    pipe = load_pipeline(load_settings(env={}, model_dir=args.model_dir, compile="off")).pipe
    graphed = pipe.text_encoder.forward
    if not isinstance(graphed, encoder_graph.GraphedTextEncoder):
        print(json.dumps({"error": "no CUDA graph installed on the text encoder"}))
        return 1

    def encode(prompts):
        with torch.inference_mode():
            embeddings, _ = pipe.encode_prompt(
                prompt=list(prompts), device="cuda", do_classifier_free_guidance=False
            )
        torch.cuda.synchronize()
        return embeddings

    def median_ms(prompts, n=15):
        times = []
        for _ in range(n):
            started = time.perf_counter()
            encode(prompts)
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1e3, 2)

    row, from_graph = {}, {}
    for prompts in PROMPT_SETS:
        encode(prompts)  # captures this batch size
        from_graph[len(prompts)] = [e.clone() for e in encode(prompts)]
        row[f"graph_{len(prompts)}_prompts_ms"] = median_ms(prompts)
    kept = encode(PROMPT_SETS[0])
    encode(PROMPT_SETS[1])  # a replay of another graph must not touch what the caller kept
    row.update(replays=graphed.replays, broken=graphed.broken)
    encoder_graph.uninstall(pipe.text_encoder)
    identical = graphed.replays > 0 and graphed.broken is None
    for prompts in PROMPT_SETS:
        eager = encode(prompts)
        row[f"eager_{len(prompts)}_prompts_ms"] = median_ms(prompts)
        diff = max(float((a - b).abs().max()) for a, b in zip(eager, from_graph[len(prompts)]))
        row[f"max_abs_diff_{len(prompts)}_prompts"] = diff
        identical = identical and diff == 0.0
    row["kept_result_intact"] = bool(torch.equal(kept[0], encode(PROMPT_SETS[0])[0]))
    print(json.dumps(row), flush=True)
    return 0 if identical and row["kept_result_intact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
