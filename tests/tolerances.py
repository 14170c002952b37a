"""Every figure a test asserts that depends on the CPU target: one table, with where it was measured.

The int8 model is a function of the resolved target_cpu (quantcli.quantizers.resolve), not of the
machine: tests build for the named TARGET and take their floors from here. A model built for avx2
(pair-safe weights: no int16 pair sum can saturate, export's report counts 0 saturable pairs)
computes the same integers on AVX2, AVX-512 and VNNI machines, so its ONNX Runtime figures hold on
all of them. A vnni-target model (8-bit weights) can saturate on an AVX2 machine: no figure of one
is asserted from ORT's fused kernels there (tests/peer.py runs it with graph optimizations off on such
a machine, which computes the products a VNNI machine does, requantized in float).

Measured with torch 2.13, torchao 0.18, onnxruntime 1.32 at target avx2 on an Intel Xeon with
AVX-512 VNNI (exact there, and the same on AVX2 since nothing saturates), 2026-12-05. Each floor
sits a few dB (or points) under the measured value in its comment.
"""

from __future__ import annotations

TARGET = "avx2"
QUANTIZATION = {"target_cpu": TARGET}  # the recipe section the tests build with

# tests/test_cli_chain.py: tests/models.py's MODELS through the CLI chain, fp32 vs ORT int8 SQNR floor (dB).
CHAIN_SQNR_DB = {
    "resnet": 40,  # 43.2 (8-bit weights on VNNI: 45.2; 7-bit everywhere: 40.8)
    "mobilenet_v2": 38,  # 41.3
    "mobilenet_v3": 38,  # 39.8 (43.2 before Hardswish was written out as x * hardsigmoid(x))
    "unet": 46,  # 50.8
    "audio": 44,  # 47.4
    "mlp": 29,  # 32.4
    "vit": 29,  # 31.8
    "bert": 34,  # 35.5 (37.0 with the embedding tables float)
    "gpt": 34,  # 36.9 (38.0 with the embedding tables float)
    "two_io": 28,  # 36.3 (the worse output)
    "hf_bert": 32,  # 35.5 (35.7 with the embedding tables float)
}

# tests/test_zoo.py: (SQNR floor ORT vs fp32 of the input-dependent part, None where that part is
# below 0.1 % of the output; raw-output floor (CNNs) or None), dB. The MobileNets, EfficientNet and
# ShuffleNet are scaled by tests/zoo.py's unit_signal (without it their share is 1e-8 to 1e-5).
ZOO_SQNR_DB: dict[str, tuple[float | None, float | None]] = {
    "tv_resnet": (12, 30),  # 16.8 (input-dependent share 1.2 %), raw 33.2
    "tv_mobilenet_v2": (19, 31),  # 22.1 (share 1.7 %), raw 34.9
    "tv_mobilenet_v3": (15, 24),  # 18.6 (share 11 %), raw 27.4
    "tv_efficientnet": (10, 22),  # 12.9 (share 4.2 %), raw 25.7
    "tv_regnet": (10, 35),  # 13.6 (share 0.16 %), raw 38.9
    "tv_shufflenet": (15, 25),  # 18.5 (share 8.0 %), raw 28.9
    "tv_convnext": (25, 25),  # 28.6 (share 96 %), raw 28.4
    "tv_vit": (25, None),  # 28.3
    "tv_swin": (23, None),  # 26.1
    "timm_tf_efficientnet_lite0": (5, 26),  # 8.6 (share 0.63 %), raw 29.6 (7-bit 25.6)
    "timm_tf_mobilenetv3": (8, 16),  # 11.4 (share 14 %), raw 19.7
    "timm_resnet10t": (7, 31),  # 11.7 (share 0.12 %), raw 34.1 (7-bit 33.5)
    "hf_bert": (40, None),  # 43.5: the int8 tables' own rounding (48.5 with them float)
    "hf_distilbert": (36, None),  # 39.5 (41.9 with float tables)
    "hf_roberta": (38, None),  # 41.8 (47.8 with float tables)
    "hf_gpt2": (33, None),  # 35.4 (36.1 with a float table)
    "hf_t5_encoder": (32, None),  # 35.4 (8-bit on VNNI 37.6, 7-bit 32.9)
    "hf_vit": (32, None),  # 35.5
    "hf_whisper_encoder": (29, None),  # 32.4
    "hf_wav2vec2": (26, None),  # 28.9 (the weight-normed positional conv included)
}

# tests/test_examples.py: configs/<recipe> -> (the int8 metric's floor, how far int8 may fall below fp32).
EXAMPLE_METRIC = {
    "sentiment/recipe.yaml": (0.8, 0.01),  # fp32 0.833, int8 0.833
    "embedding/recipe.yaml": (0.99, 0.01),  # cosine to fp32 PyTorch: fp32 ONNX 1.0, int8 0.99997
    "photos/hf.yaml": (0.85, 0.01),  # fp32 0.975, int8 0.975
    "photos/torchvision.yaml": (0.85, 0.01),  # fp32 0.950, int8 0.942 (7-bit weights: 0.908)
    "photos/timm.yaml": (0.85, 0.01),  # fp32 0.958, int8 0.958
}

# tests/test_qat.py: the digits QAT model after three SGD steps of a user's own loop (observers live) against its
# conversion, by the target the shared QAT run resolved on the machine at hand (dB). Measured on both targets.
QAT_OWN_LOOP_SQNR_DB = {
    "vnni": 60,  # 69.6 (8-bit weights)
    "avx2": 45,  # 53.3: convert lowers the 14 weights the last step pushed over a pair's limit (75.5 without)
    "avx512": 45,  # the same weights as avx2
}

# tests/test_tune.py: trials `tune --min-sqnr 25` may take on the outlier MLP.
TUNE_MAX_TRIALS = 6  # measured 6 at avx2 (fc1, fc3, then fc2); 4 or fewer with 8-bit weights on VNNI
