# Sourced by the GPU benchmark scripts.
#
# run_sampled OUT ERR LIMIT CMD...: runs CMD under `timeout LIMIT` (seconds), stdout to OUT and
# stderr to ERR, while nvidia-smi samples the device memory in use every 50 ms. Sets `rc` (CMD's
# exit status, 124 on timeout) and `peak` (the largest sample in MiB, CUDA context included;
# empty when CMD ended before the first sample).
run_sampled() {
  local out=$1 err=$2 limit=$3; shift 3
  local samples; samples=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$samples" &
  local sampler=$!
  timeout "$limit" "$@" > "$out" 2> "$err"
  rc=$?
  kill $sampler; wait $sampler 2>/dev/null
  peak=$(sort -n "$samples" | tail -1)
  rm -f "$samples"
}
