"""mmjax: multimodal (image-text-label) foundation models on JAX/Flax."""
import os

# XLA:CPU runs a program's independent collectives concurrently, each holding a thread of one
# pool until every device arrives, and sizes that pool max(NPROC or cores, devices). With
# several CPU devices on few cores, devices that reach two collectives in different orders can
# hold every thread and deadlock: 8 devices on 2 cores hung in CoCa's train step, with one
# all-gather inside the scanned layers and one outside ("only 4 of 8 threads arrived").
# NPROC is what XLA reads for the pool size; idle threads cost nothing measurable. It takes
# effect only before JAX starts its CPU backend, hence here, at import.
os.environ.setdefault("NPROC", str(max(
    os.cpu_count() or 1, 64, 8 * int(os.environ.get("JAX_NUM_CPU_DEVICES") or 0))))
