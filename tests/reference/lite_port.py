"""The reference for tests/parity_lite12.rs: an independent numpy port of the forward
pass (eval mode) of `efficientnet_lite_pytorch` 0.1.0 (PyPI), up to the stride-16 stage,
reading the pinned weights files (legacy torch format) without torch.

Its rules are the package's (round_filters, round_repeats, fixed stem and head, static
SAME padding for the native size), so Lite1's and Lite2's shapes are derived, not typed
in. On Lite0 it reproduces the parity fixture (../shared/fixtures/lite0-d384,
img0_feat_blocks4/10.npy, made with torch) to 1.4e-6 of the largest value.

Usage: lite_port.py FIXTURES_DIR BACKBONES_DIR > tests/reference/lite12_stages.json
writes, for Lite1 and Lite2 on the fixture's img0_input.npy, per stage: the shape, each
channel's spatial mean and standard deviation, and each channel at the four corners and
the centre (where static padding shows first)."""
import pickle, sys, collections, math
import numpy as np

def load_pth(path):
    f = open(path, 'rb')
    for _ in range(3): pickle.load(f)
    types = {}
    class U(pickle.Unpickler):
        def find_class(s, mod, name):
            if name == '_rebuild_tensor_v2':
                return lambda st, off, size, stride, *a: ('T', st, off, tuple(size), tuple(stride))
            if name == 'OrderedDict': return collections.OrderedDict
            if mod.startswith('torch'): return name
            return super().find_class(mod, name)
        def persistent_load(s, pid):
            types[pid[2]] = pid[1]
            return pid[2]  # storage key
    d = U(f).load()
    keys = pickle.load(f)
    storages = {}
    for k in keys:
        n = int.from_bytes(f.read(8), 'little')
        dt = {'FloatStorage': '<f4', 'LongStorage': '<i8'}[types[k]]
        storages[k] = np.frombuffer(f.read(n * np.dtype(dt).itemsize), dtype=dt)
    out = {}
    for k, v in d.items():
        if isinstance(v, tuple) and v[0] == 'T':
            _, st, off, size, stride = v
            if types[st] != 'FloatStorage': continue
            a = np.lib.stride_tricks.as_strided(storages[st][off:], size, [s * 4 for s in stride])
            out[k] = np.array(a, dtype=np.float64)
    return out

PARAMS = {'lite0': (1.0, 1.0, 224), 'lite1': (1.0, 1.1, 240), 'lite2': (1.1, 1.2, 260)}
# (repeats, kernel, stride, expand, in, out) as in the package's blocks_args strings
BASE = [(1,3,1,1,32,16),(2,3,2,6,16,24),(2,5,2,6,24,40),(3,3,2,6,40,80),(3,5,1,6,80,112),(4,5,2,6,112,192),(1,3,1,6,192,320)]

def round_filters(f, w):
    f *= w
    new = max(8, int(f + 4) // 8 * 8)
    if new < 0.9 * f: new += 8
    return int(new)

def conv(x, w, stride, pad, groups):
    # x [C,H,W], w [O,I/g,k,k]; pad (top,bottom,left,right)
    x = np.pad(x, ((0,0),(pad[0],pad[1]),(pad[2],pad[3])))
    O, Ig, k, _ = w.shape
    C, H, W = x.shape
    oh, ow = (H - k) // stride + 1, (W - k) // stride + 1
    out = np.zeros((O, oh, ow))
    if groups == 1:
        for i in range(k):
            for j in range(k):
                patch = x[:, i:i + stride * oh:stride, j:j + stride * ow:stride]
                out += np.einsum('oc,chw->ohw', w[:, :, i, j], patch)
    else:
        for i in range(k):
            for j in range(k):
                patch = x[:, i:i + stride * oh:stride, j:j + stride * ow:stride]
                out += w[:, 0, i, j][:, None, None] * patch
    return out

def same(size, k, s):
    o = math.ceil(size / s)
    p = max((o - 1) * s + k - size, 0)
    return p // 2, p - p // 2

def bn(x, sd, p):
    g, b, m, v = (sd[f'{p}.{n}'] for n in ('weight', 'bias', 'running_mean', 'running_var'))
    return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-3) * g[:, None, None] + b[:, None, None]

relu6 = lambda x: np.clip(x, 0, 6)

def forward(variant, sd, x):
    w, d, native = PARAMS[variant]
    size = native
    a, b2 = same(size, 3, 2)
    x = relu6(bn(conv(x, sd['_conv_stem.weight'], 2, (a, b2, a, b2), 1), sd, '_bn0'))
    size = math.ceil(size / 2)
    idx = 0
    feats = {}
    for si, (r, k, s, e, cin, cout) in enumerate(BASE):
        cin = 32 if si == 0 else round_filters(cin, w)
        cout = round_filters(cout, w)
        reps = r if si in (0, len(BASE) - 1) else int(math.ceil(d * r))
        for rep in range(reps):
            stride, inp_c = (s, cin) if rep == 0 else (1, cout)
            p = f'_blocks.{idx}'
            inp = x
            if e != 1:
                x = relu6(bn(conv(x, sd[f'{p}._expand_conv.weight'], 1, (0,0,0,0), 1), sd, f'{p}._bn0'))
            t, bo = same(size, k, stride)
            x = relu6(bn(conv(x, sd[f'{p}._depthwise_conv.weight'], stride, (t, bo, t, bo), x.shape[0]), sd, f'{p}._bn1'))
            size = math.ceil(size / stride)
            x = bn(conv(x, sd[f'{p}._project_conv.weight'], 1, (0,0,0,0), 1), sd, f'{p}._bn2')
            if stride == 1 and inp_c == cout:
                x = x + inp
            feats[idx] = x
            idx += 1
        if si == 2: feats['a'] = x
        if si == 4:
            feats['b'] = x
            return feats

def summary(f):
    c, h, w = f.shape
    points = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)]
    return {
        'shape': [c, h, w],
        'mean': [round(float(v), 6) for v in f.mean(axis=(1, 2))],
        'std': [round(float(v), 6) for v in f.std(axis=(1, 2))],
        'points': [[y, x] for y, x in points],
        'at_points': [[round(float(f[ch, y, x]), 6) for y, x in points] for ch in range(c)],
    }

if __name__ == '__main__':
    import json, os
    fixtures, backbones = sys.argv[1:3]
    x = np.load(os.path.join(fixtures, 'lite0-d384', 'img0_input.npy')).astype(np.float64)
    x = x.reshape(3, 288, 288)
    out = {}
    for variant, file in [('efficientnet_lite1', 'efficientnet-lite1-77cc7160.pth'),
                          ('efficientnet_lite2', 'efficientnet-lite2-9656183e.pth')]:
        f = forward(variant.split('_')[1], load_pth(os.path.join(backbones, file)), x)
        out[variant] = {'stage_a': summary(f['a']), 'stage_b': summary(f['b'])}
    json.dump(out, sys.stdout, indent=None, separators=(',', ':'))
    print()
