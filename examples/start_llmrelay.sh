#!/bin/bash
# A FastChat start script with `fastchat` replaced by `llmrelay`: each part by hand, in any order.
# No `sleep 60`: each command below waits for what it needs (workers retry until the controller
# answers; the API server reads the worker table as workers appear).
set -e
LOG_DIR=./logs
mkdir -p $LOG_DIR

python -m llmrelay.serve.controller --host 127.0.0.1 --port 21001 \
    --dispatch-method shortest_queue > $LOG_DIR/controller.log 2>&1 &

python -m llmrelay.serve.model_worker --host 127.0.0.1 --port 21002 \
    --worker-address http://localhost:21002 --controller-address http://localhost:21001 \
    --model-path smollm2 --model-names smol --num-gpus 1 > $LOG_DIR/worker1.log 2>&1 &

python -m llmrelay.serve.model_worker --host 127.0.0.1 --port 21003 \
    --worker-address http://localhost:21003 --controller-address http://localhost:21001 \
    --model-path gemma3-270m --model-names gemma --num-gpus 1 > $LOG_DIR/worker2.log 2>&1 &

python -m llmrelay.serve.openai_api_server --host 127.0.0.1 --port 8000 \
    --controller-address http://localhost:21001 > $LOG_DIR/api_server.log 2>&1 &

# Ready when both models are listed.
until curl -sf http://localhost:8000/v1/models | grep -q gemma; do sleep 0.5; done
curl -s http://localhost:8000/v1/models | python3 -m json.tool
