mkdir -p bin && xz -dc target/carry/strata.xz > bin/strata && chmod +x bin/*
export CUDA_PATH=/usr/local/cuda LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
c=configs/bench/gpt2_small.toml
timeout 50 bin/strata bench-train $c --backend cuda --dtype bf16 --warmup 2 --steps 8 >> $OUT/train_gpu.jsonl 2>> $OUT/train.err; echo "bf16 rc=$?"
timeout 50 bin/strata bench-train $c --backend cuda --dtype f32 --set 'train.mixed_precision="bf16"' --warmup 2 --steps 8 >> $OUT/train_gpu.jsonl 2>> $OUT/train.err; echo "mixed rc=$?"
cut -c1-300 $OUT/train_gpu.jsonl; sort -u $OUT/train.err | head -5
