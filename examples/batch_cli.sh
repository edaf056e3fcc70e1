#!/usr/bin/env bash
# The batch CLI on a few lines, through a running server with the plugin:
#   bash examples/batch_cli.sh [SERVER_URL]        (default http://127.0.0.1:8000)
# Without --server, give the model and vLLM's engine flags instead:
#   vllm-loglik score MODEL --input requests.jsonl --output scores.jsonl --dtype float32
set -euo pipefail
server="${1:-http://127.0.0.1:8000}"
dir="$(mktemp -d)"
cat > "$dir/requests.jsonl" <<'END'
{"id": "doc", "prompt": "A short document to measure.", "loglikelihood": {"scope": "rolling"}}
{"id": "question", "prompt": "The capital of France is", "loglikelihood": {"continuations": [" Paris", " Rome"]}}
{"id": "reply", "messages": [{"role": "user", "content": "Hi"}], "loglikelihood": {"continuations": ["Hello!", "Go away."]}}
{"id": "broken", "prompt": 42}
END
status=0
vllm-loglik score --server "$server" --input "$dir/requests.jsonl" --output "$dir/scores.jsonl" \
  --report "$dir/report.html" || status=$?
cat "$dir/scores.jsonl"
echo "exit status $status (1: a line failed, and its error is in the output)"
echo "report (open it in a browser): $dir/report.html"
