#!/usr/bin/env python3
"""The same face pipeline with onnxruntime (what a user would pick instead of tract), one thread.

Usage: ort_stages.py MODELS_DIR REPEAT IMAGE... ; prints one JSON object of per-stage times (ms).
Pre- and post-processing follow facepay's Rust pipeline (YuNet at <=320 px, ArcFace alignment,
two MiniFASNet crops, SFace). onnxruntime cannot load the blocked-DequantizeLinear SFace file, so
the int8 weights are folded to fp32 here exactly as facepay folds them.
"""
import json, sys, time
import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
from PIL import Image, ImageOps

ort.set_default_logger_severity(3)


def session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else model,
                                opts, providers=["CPUExecutionProvider"])

def fold_blocked_dequantize(model):
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and all(i in inits for i in n.input if i):
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            z = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32) if len(n.input) > 2 and n.input[2] else np.zeros_like(s)
            attrs = {a.name: a.i for a in n.attribute}
            axis, block = attrs.get("axis", 1) % max(q.ndim, 1), attrs.get("block_size", 0)
            if s.size == 1:
                out = (q - z.reshape(())) * s.reshape(())
            elif block:
                s = np.repeat(s, block, axis=axis).take(range(q.shape[axis]), axis=axis)
                z = np.repeat(z, block, axis=axis).take(range(q.shape[axis]), axis=axis)
                out = (q - z) * s
            else:
                shape = [1] * q.ndim; shape[axis] = -1
                out = (q - z.reshape(shape)) * s.reshape(shape)
            g.initializer.append(numpy_helper.from_array(out.astype(np.float32), n.output[0]))
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    names = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name in used and i.name not in names]
    del g.input[:]
    g.input.extend(inputs)
    return model

ARCFACE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)

def detect(sess, rgb):
    h, w = rgb.shape[:2]
    scale = min(1.0, 320 / max(w, h))
    iw, ih = max(1, round(w * scale)), max(1, round(h * scale))
    pw, ph = -(-iw // 32) * 32, -(-ih // 32) * 32
    pw = max(pw, ph)  # as facepay pads a portrait frame (src/detect.rs, input_size)
    small = np.asarray(Image.fromarray(rgb).resize((iw, ih), Image.BILINEAR), np.float32)
    blob = np.zeros((1, 3, ph, pw), np.float32)
    blob[0, :, :ih, :iw] = small[:, :, ::-1].transpose(2, 0, 1)
    out = sess.run(None, {"input": blob})
    sx, sy = w / iw, h / ih
    faces = []
    for k, stride in enumerate((8, 16, 32)):
        cols = pw // stride
        cls, obj, bbox, kps = out[k][0, :, 0], out[3 + k][0, :, 0], out[6 + k][0], out[9 + k][0]
        score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
        for i in np.nonzero(score >= 0.6)[0]:
            r, c = divmod(int(i), cols)
            cx, cy = (c + bbox[i, 0]) * stride, (r + bbox[i, 1]) * stride
            bw, bh = np.exp(bbox[i, 2]) * stride, np.exp(bbox[i, 3]) * stride
            lm = np.stack([(kps[i, 0::2] + c) * stride * sx, (kps[i, 1::2] + r) * stride * sy], 1)
            faces.append((float(score[i]), [(cx - bw / 2) * sx, (cy - bh / 2) * sy, bw * sx, bh * sy], lm))
    faces.sort(key=lambda f: -f[0])
    kept = []
    for f in faces:
        if all(iou(f[1], k[1]) <= 0.3 for k in kept):
            kept.append(f)
    return kept

def iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    return inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1e-6)

def similarity(src, dst):
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    norm = (s ** 2).sum()
    a = (s * d).sum() / norm
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / norm
    tx = md[0] - (a * ms[0] - b * ms[1])
    ty = md[1] - (b * ms[0] + a * ms[1])
    return a, b, tx, ty

def align(rgb, lm):
    a, b, tx, ty = similarity(lm.astype(np.float32), ARCFACE)
    det = a * a + b * b
    ia, ib = a / det, -b / det
    # PIL's affine maps output (x, y) to input (a x + b y + c, d x + e y + f).
    coeffs = (ia, -ib, -(ia * tx - ib * ty), ib, ia, -(ib * tx + ia * ty))
    return np.asarray(Image.fromarray(rgb).transform((112, 112), Image.AFFINE, coeffs, Image.BILINEAR))

def liveness_crop(w, h, box, scale):
    x, y, bw, bh = box
    scale = min(scale, (h - 1) / bh, (w - 1) / bw)
    nw, nh = bw * scale, bh * scale
    cx, cy = x + bw / 2, y + bh / 2
    x1, y1, x2, y2 = cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2
    if x1 < 0: x2 -= x1; x1 = 0
    if y1 < 0: y2 -= y1; y1 = 0
    if x2 > w - 1: x1 -= x2 - w + 1; x2 = w - 1
    if y2 > h - 1: y1 -= y2 - h + 1; y2 = h - 1
    return int(max(x1, 0)), int(max(y1, 0)), int(x2), int(y2)

def main():
    models, repeat, images = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    yunet = session(onnx.load(f"{models}/face_detection_yunet_2026may.onnx"))
    sface = session(fold_blocked_dequantize(onnx.load(f"{models}/face_recognition_sface_2021dec_int8bq.onnx")))
    fas = [(session(onnx.load(f"{models}/2.7_80x80_MiniFASNetV2.onnx")), 2.7),
           (session(onnx.load(f"{models}/4_0_0_80x80_MiniFASNetV1SE.onnx")), 4.0)]
    stages = {k: [] for k in ("decode", "detect", "align", "liveness", "embed", "total")}
    for _ in range(repeat):
        for path in images:
            t0 = time.perf_counter()
            rgb = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
            t1 = time.perf_counter()
            faces = detect(yunet, rgb)
            t2 = time.perf_counter()
            if not faces:
                continue
            _, box, lm = faces[0]
            face = align(rgb, lm)
            t3 = time.perf_counter()
            h, w = rgb.shape[:2]
            for sess, scale in fas:
                x1, y1, x2, y2 = liveness_crop(w, h, box, scale)
                crop = np.asarray(Image.fromarray(rgb[y1:y2 + 1, x1:x2 + 1]).resize((80, 80), Image.BILINEAR), np.float32)
                sess.run(None, {sess.get_inputs()[0].name: crop[:, :, ::-1].transpose(2, 0, 1)[None].copy()})
            t4 = time.perf_counter()
            emb = sface.run(None, {"data": face.astype(np.float32).transpose(2, 0, 1)[None].copy()})[0][0]
            emb /= np.linalg.norm(emb)
            t5 = time.perf_counter()
            for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
                stages[k].append(v * 1000)
    print(json.dumps(stages))

if __name__ == "__main__":
    main()
