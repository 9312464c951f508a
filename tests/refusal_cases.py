"""The bad inputs of the refusal table: each builds its input in a case directory and returns
(argv, the file the one-line error must name). Kept as data so a new defect is one line here."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

from reapsurgery.common.checkpoint import INDEX, Checkpoint

Case = Callable[[Path, dict], tuple[list, str]]


def _json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _ckpt(d: Path, w: dict) -> Path:
    shutil.copytree(w["ckpt"], d / "ckpt")
    return d / "ckpt"


def _edit_config(d: Path, w: dict, **changes) -> Path:
    """A checkpoint copy with config.json's keys changed (a value of ... removes the key)."""
    ckpt = _ckpt(d, w)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    _json(ckpt / "config.json", {k: v for k, v in cfg.items() if v is not ...})
    return ckpt


def _first_2d(ckpt: Path) -> tuple[str, str]:
    c = Checkpoint.open(ckpt)
    name, (shard, _) = next((n, v) for n, v in c.tensors().items() if len(v[1].shape) == 2)
    return name, shard


def _edit_header(d: Path, w: dict, edit: Callable[[dict, str], None] | None = None,
                 raw_edit: Callable[[str, str, dict], str] | None = None) -> tuple[Path, str]:
    """A checkpoint copy with one shard's header JSON changed; returns (ckpt, shard name)."""
    ckpt = _ckpt(d, w)
    name, shard = _first_2d(ckpt)
    data = (ckpt / shard).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    if edit:
        edit(header, name)
    text = json.dumps(header)
    if raw_edit:
        text = raw_edit(text, name, header)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    (ckpt / shard).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return ckpt, shard


def _apply_on(ckpt_and_shard, w, d) -> tuple[list, str]:
    ckpt, shard = ckpt_and_shard
    return ["apply", w["mask"], ckpt, d / "out"], shard


def _edit_index(d: Path, w: dict, edit) -> Path:
    ckpt = _ckpt(d, w)
    index = json.loads((ckpt / INDEX).read_text())
    edit(index)
    _json(ckpt / INDEX, index)
    return ckpt


def _index_text(d: Path, w: dict, edit: Callable[[str], str]) -> Path:
    """A checkpoint copy whose index text is edited as text (what a JSON round trip cannot write);
    lone surrogates become the bytes they escape (invalid UTF-8)."""
    ckpt = _ckpt(d, w)
    text = edit((ckpt / INDEX).read_text())
    _raw(ckpt / INDEX, text.encode("utf-8", "surrogateescape"))
    return ckpt


def _mask(w: dict, **changes) -> dict:
    return {**json.loads(Path(w["mask"]).read_text()), **changes}


def _sal(w: dict) -> dict:
    return json.loads(Path(w["saliency"]).read_text())


def _sal_with(d: Path, w: dict, edit) -> Path:
    s = _sal(w)
    edit(s)
    return _json(d / "s.json", s)


def _layer0(s: dict) -> dict:
    return next(iter(s["layers"].values()))


def _bad_mask_file(make: Callable[[Path, dict], Path]) -> Case:
    def case(d, w):
        mask = make(d, w)
        return ["apply", mask, w["ckpt"], d / "out"], mask.name
    return case


def _bad_sal_file(make: Callable[[Path, dict], Path]) -> Case:
    def case(d, w):
        sal = make(d, w)
        return ["plan", sal, "--keep", 4, "-o", d / "m.json"], sal.name
    return case


def _layout(d: Path, w: dict, content: bytes) -> tuple[list, str]:
    path = _raw(d / "layout.json", content)
    return ["inspect", w["ckpt"], "--layout", path], "layout.json"


def _calibrate(d: Path, w: dict, *extra, ckpt=None) -> list:
    return ["calibrate", ckpt or w["ckpt"], "-o", d / "s.json", "--device", "cpu", "-q", "--num-samples", 2,
            "--max-length", 8, *extra]


def _tokens(d: Path, w: dict, ids: list[int]) -> tuple[list, str]:
    data = _raw(d / "ids.jsonl", (json.dumps({"input_ids": ids}) + "\n").encode())
    return _calibrate(d, w, "--dataset", data), "ids.jsonl"


VOCAB = 320  # fixtures.build COMMON vocab_size
STDOUT = "'-': writing to standard output is not supported"  # `-o -` would have written a file named '-'


# -- outputs: never over a file without --overwrite, never onto an input by any spelling --------


def _file(path: Path, text: str = "mine") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _link(path: Path, to: Path) -> Path:
    path.symlink_to(to)
    return path


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fifo(path: Path) -> Path:
    """A named pipe where an output goes (a device such as /dev/null is the same case: not a file)."""
    os.mkfifo(path)
    return path


def _layout_file(d: Path, w: dict) -> Path:
    return _json(d / "layout.json", w["layout"])


def _copy(d: Path, src: Path, name: str) -> Path:
    return Path(shutil.copy(src, d / name))


def _plan_to(w: dict, out, *extra) -> list:
    return ["plan", w["saliency"], "--keep", 4, "-o", out, *extra]


def _calibrate_to(d: Path, w: dict, out, *extra, ckpt=None) -> list:
    return ["calibrate", ckpt or w["ckpt"], "-o", out, "--device", "cpu", "-q", "--num-samples", 2,
            "--max-length", 8, *extra]


def _evaluate_to(w: dict, *extra) -> list:
    return ["evaluate", w["ckpt"], "--mask", w["mask"], "--device", "cpu", "-q", "--num-samples", 2,
            "--max-length", 8, *extra]


def _state_of_an_earlier_run(d: Path, name: str = "s.json.resume") -> Path:
    from reapsurgery.calibration import statedir

    statedir.adopt(d / name)
    (d / name / statedir.STATE).write_bytes(b"a state")
    return d / name


def _apply_over(d: Path, w: dict, holding: Path, *extra) -> list:
    """apply --overwrite into an OUT that holds `holding` (moved there: an input of the run)."""
    return ["apply", holding, w["ckpt"], holding.parent, "--overwrite", *extra]


OUTPUT_CASES: dict[str, Case] = {
    "plan: -o an existing file": lambda d, w: (_plan_to(w, _file(d / "m.json")), "m.json"),
    "merge: -o an existing file": lambda d, w: (["merge-saliency", w["saliency"], "-o", _file(d / "m.json")], "m.json"),
    "calibrate: -o an existing file": lambda d, w: (_calibrate_to(d, w, _file(d / "s.json")), "s.json"),
    "evaluate: -o an existing file": lambda d, w: (_evaluate_to(w, "-o", _file(d / "r.json")), "r.json"),
    "evaluate: --plot an existing file": lambda d, w: (_evaluate_to(w, "--plot", _file(d / "p.png")), "p.png"),
    "plan: -o a FIFO, even with --overwrite": lambda d, w: (_plan_to(w, _fifo(d / "m.json"), "--overwrite"), "m.json"),
    "calibrate: -o a FIFO, even with --overwrite": lambda d, w: (_calibrate_to(d, w, _fifo(d / "s.json"), "--overwrite"), "s.json"),
    "evaluate: --plot a FIFO, even with --overwrite": lambda d, w: (_evaluate_to(w, "--plot", _fifo(d / "p.png"), "--overwrite"), "p.png"),
    "plan: -o the --layout file": lambda d, w: (_plan_to(w, lay := _layout_file(d, w), "--layout", lay, "--overwrite"), "layout.json"),
    "plan: -o a symlink to its saliency": lambda d, w: (_plan_to(w, _link(d / "m.json", w["saliency"]), "--overwrite"), "m.json"),
    "plan: -o a hard link of its saliency": lambda d, w: (_plan_to(w, (os.link(w["saliency"], d / "h.json"), d / "h.json")[1], "--overwrite"), "h.json"),
    "plan: -o its saliency through ..": lambda d, w: (_plan_to(w, _dir(d / "x") / ".." / ".." / w["saliency"].parent.name / "saliency.json", "--overwrite"), "saliency.json"),
    "plan: -o its saliency by a relative path": lambda d, w: (_plan_to(w, os.path.relpath(w["saliency"]), "--overwrite"), "saliency.json"),
    "plan: -o into --ckpt through a symlinked directory": lambda d, w: (_plan_to(w, _link(d / "c", _ckpt(d, w)) / "m.json", "--ckpt", d / "ckpt"), "m.json"),
    "plan: -o a symlink to CKPT/config.json": lambda d, w: (_plan_to(w, _link(d / "m.json", _ckpt(d, w) / "config.json"), "--ckpt", d / "ckpt", "--overwrite"), "m.json"),
    "merge: -o a symlink to one of its inputs": lambda d, w: (["merge-saliency", a := _copy(d, w["saliency"], "a.json"), "-o", _link(d / "m.json", a), "--overwrite"], "m.json"),
    "calibrate: -o the --dataset file": lambda d, w: (_calibrate_to(d, w, ds := _file(d / "t.txt", "some text"), "--dataset", ds, "--overwrite"), "t.txt"),
    "calibrate: -o the --layout file": lambda d, w: (_calibrate_to(d, w, lay := _layout_file(d, w), "--layout", lay, "--overwrite"), "layout.json"),
    "calibrate: -o a symlink to CKPT/config.json": lambda d, w: (_calibrate_to(d, w, _link(d / "s.json", _ckpt(d, w) / "config.json"), "--overwrite", ckpt=d / "ckpt"), "s.json"),
    "calibrate: -o X where X.resume is the checkpoint": lambda d, w: (_calibrate_to(d, w, d / "ckpt", ckpt=shutil.copytree(w["ckpt"], d / "ckpt.resume")), "ckpt.resume"),
    "calibrate: OUTPUT.resume a user's directory": lambda d, w: (_calibrate_to(d, w, (_file(d / "s.json.resume" / "notes.txt"), d / "s.json")[1]), "s.json.resume"),
    "calibrate: OUTPUT.resume a user's file": lambda d, w: (_calibrate_to(d, w, (_file(d / "s.json.resume"), d / "s.json")[1], "--overwrite"), "s.json.resume"),
    "calibrate: OUTPUT.resume a symlink to a directory": lambda d, w: (_calibrate_to(d, w, (_link(d / "s.json.resume", _dir(d / "mine")), d / "s.json")[1], "--overwrite"), "s.json.resume"),
    "calibrate: OUTPUT.resume marked for another output": lambda d, w: (_calibrate_to(d, w, (os.rename(_state_of_an_earlier_run(d, "o.json.resume"), d / "s.json.resume"), d / "s.json")[1], "--overwrite"), "s.json.resume"),
    "calibrate: a state of an earlier run, no --resume": lambda d, w: (_calibrate_to(d, w, (_state_of_an_earlier_run(d), d / "s.json")[1]), "s.json.resume"),
    "evaluate: -o its mask": lambda d, w: (_evaluate_to(w, "-o", w["mask"], "--overwrite"), "mask.json"),
    "evaluate: -o the saliency": lambda d, w: (["evaluate", w["ckpt"], w["saliency"], "--keep", 4, "-o", w["saliency"], "--overwrite"], "saliency.json"),
    "evaluate: -o CKPT/config.json": lambda d, w: (["evaluate", _ckpt(d, w), "--mask", w["mask"], "-o", d / "ckpt" / "config.json", "--overwrite"], "config.json"),
    "evaluate: -o inside CKPT": lambda d, w: (["evaluate", _ckpt(d, w), "--mask", w["mask"], "-o", d / "ckpt" / "r.json"], "r.json"),
    "evaluate: --plot is -o by another name": lambda d, w: (_evaluate_to(w, "-o", d / "r.png", "--plot", _dir(d / "x") / ".." / "r.png"), "r.png"),
    "evaluate: -o the --dataset file": lambda d, w: (_evaluate_to(w, "-o", ds := _file(d / "t.txt", "some text"), "--dataset", ds, "--overwrite"), "t.txt"),
    "apply: --overwrite into OUT holding its mask": lambda d, w: (_apply_over(d, w, _copy(_dir(d / "out"), w["mask"], "m.json")), "out"),
    "apply: --overwrite into OUT holding the --layout file": lambda d, w: (["apply", w["mask"], w["ckpt"], d / "out", "--overwrite", "--layout", _json(_file(d / "out" / "keep.txt").parent / "layout.json", w["layout"])], "out"),
    "apply --dry-run: OUT holding its mask": lambda d, w: (_apply_over(d, w, _copy(_dir(d / "out"), w["mask"], "m.json"), "--dry-run"), "out"),
    "apply: OUT is its mask": lambda d, w: (["apply", w["mask"], w["ckpt"], w["mask"], "--overwrite"], "mask.json"),
    "apply: OUT a symlink to CKPT": lambda d, w: (["apply", w["mask"], _ckpt(d, w), _link(d / "out", d / "ckpt"), "--overwrite"], "out"),
    "apply: OUT a symlink into CKPT": lambda d, w: (["apply", w["mask"], _ckpt(d, w), _link(d / "out", _dir(d / "ckpt" / "sub"))], "out"),
    "apply: OUT holds CKPT, spelled with ..": lambda d, w: (["apply", w["mask"], _ckpt(d, w), d / "ckpt" / "..", "--overwrite"], ".."),
}


def _poison(d: Path, w: dict, tensor: str, value: float) -> tuple[Path, str]:
    """A checkpoint copy whose float32 tensor `tensor` holds `value` (NaN, infinity) in its first
    element; returns (ckpt, the shard holding it)."""
    ckpt = _ckpt(d, w)
    c = Checkpoint.open(ckpt)
    shard, info = c.tensors()[tensor]
    assert info.dtype == "F32", info
    with open(ckpt / shard, "r+b") as f:
        f.seek(c.header(shard).data_offset + info.start)
        f.write(struct.pack("<f", value))
    return ckpt, shard


def _poisoned(cmd: str, tensor: str, value: float) -> Case:
    """calibrate or evaluate over a checkpoint with a NaN or infinity in `tensor`: refused, naming its shard."""
    def case(d, w):
        ckpt, shard = _poison(d, w, tensor, value)
        if cmd == "calibrate":
            return _calibrate(d, w, ckpt=ckpt), shard
        return ["evaluate", ckpt, "--mask", w["mask"], "-q", "--device", "cpu", "--num-samples", 2,
                "--max-length", 8], shard
    return case


def _with_other_file(make: Callable[[Path], None], *flags) -> Case:
    """apply over a checkpoint holding a file it cannot copy (made by `make` at CKPT/extra/x): refused
    naming it, before anything is written."""
    def case(d, w):
        ckpt = _ckpt(d, w)
        (ckpt / "extra").mkdir()
        make(ckpt / "extra" / "x")
        return ["apply", w["mask"], ckpt, d / "out", *flags], "extra/x"
    return case


def _config_refused(cmd: str, **changes) -> Case:
    """`cmd` on a checkpoint whose config.json holds `changes`: refused naming config.json."""
    def case(d, w):
        ckpt = _edit_config(d, w, **changes)
        argv = {"inspect": ["inspect", ckpt], "verify": ["verify", ckpt], "apply": ["apply", w["mask"], ckpt, d / "out"],
                "plan": ["plan", w["saliency"], "--keep", 4, "--ckpt", ckpt, "-o", d / "m.json"],
                "calibrate": _calibrate(d, w, ckpt=ckpt)}[cmd]
        return argv, "config.json"
    return case


def _mtp_config(cmd: str, layers: int) -> Case:
    """DeepSeek-V3 (3 decoder layers, MTP layer 3) with config.json's num_hidden_layers set to `layers`."""
    def case(d, w):
        ckpt = _edit_config(d, {"ckpt": w["mtp_ckpt"]}, num_hidden_layers=layers)
        return ({"verify": ["verify", ckpt], "apply": ["apply", w["mtp_mask"], ckpt, d / "out"],
                 "inspect": ["inspect", ckpt]}[cmd], "config.json")
    return case


def _without_mtp_layer(d: Path, w: dict) -> Path:
    """The DeepSeek-V3 checkpoint without its MTP layer (layer 3, in a shard of its own)."""
    ckpt = _ckpt(d, {"ckpt": w["mtp_ckpt"]})
    index = json.loads((ckpt / INDEX).read_text())
    (ckpt / "model-mtp.safetensors").unlink()
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "model-mtp.safetensors"}
    _json(ckpt / INDEX, index)
    return ckpt


def _layer_past_stack(s: dict, layer: str) -> dict:
    s["layers"][layer] = _layer0(s)
    return s

CASES: dict[str, Case] = {
    # -- a file that is not the JSON expected (mask, saliency, config, index, layout, inspect) --
    "mask: a shard passed as the mask": lambda d, w: (["apply", Path(w["ckpt"]) / w["shard"], w["ckpt"], d / "out"], w["shard"]),
    "mask: UTF-16": _bad_mask_file(lambda d, w: _raw(d / "m.json", json.dumps(_mask(w)).encode("utf-16"))),
    "mask: UTF-16 without BOM": _bad_mask_file(lambda d, w: _raw(d / "m.json", json.dumps(_mask(w)).encode("utf-16-le"))),
    "mask: binary": _bad_mask_file(lambda d, w: _raw(d / "m.json", bytes(range(256)) * 4)),
    "mask: not UTF-8": _bad_mask_file(lambda d, w: _raw(d / "m.json", b'{"format": "\xff\xfe"}')),
    "mask: empty file": _bad_mask_file(lambda d, w: _raw(d / "m.json", b"")),
    "mask: duplicate keys": _bad_mask_file(lambda d, w: _raw(d / "m.json", json.dumps(_mask(w))[:-1].encode()
                                                             + b', "format": "reapsurgery.mask"}')),
    "mask: Infinity": _bad_mask_file(lambda d, w: _raw(d / "m.json", json.dumps(_mask(w)).replace('"version": 1', '"version": Infinity').encode())),
    "mask: NaN expert": _bad_mask_file(lambda d, w: _raw(d / "m.json", json.dumps(_mask(w)).replace("[0, 2", "[NaN, 2", 1).encode())),
    "mask: a JSON list": _bad_mask_file(lambda d, w: _json(d / "m.json", [1, 2])),
    "mask: nested too deeply": _bad_mask_file(lambda d, w: _raw(d / "m.json", b"[" * 100000 + b"]" * 100000)),
    "mask: no format": _bad_mask_file(lambda d, w: _json(d / "m.json", {k: v for k, v in _mask(w).items() if k != "format"})),
    "mask: keys 0 and 00": _bad_mask_file(lambda d, w: _json(d / "m.json", _mask(w, layers={**_mask(w)["layers"], "00": [0, 2, 5, 7]}))),
    "mask: superscript digit key": _bad_mask_file(lambda d, w: _json(d / "m.json", _mask(w, layers={**_mask(w)["layers"], "²": [0, 2, 5, 7]}))),
    "mask: layer past the stack without MTP": _bad_mask_file(lambda d, w: _json(d / "m.json", _mask(w, layers={**_mask(w)["layers"], "3": [0, 2, 5, 7]}))),
    "mask: num_experts_per_tok 0": _bad_mask_file(lambda d, w: _json(d / "m.json", _mask(w, model={**_mask(w)["model"], "num_experts_per_tok": 0}))),
    "mask: num_experts a string": _bad_mask_file(lambda d, w: _json(d / "m.json", _mask(w, model={**_mask(w)["model"], "num_experts": "8"}))),
    "mask: moe_layers not a list": _bad_mask_file(lambda d, w: _json(d / "m.json", _mask(w, model={**_mask(w)["model"], "moe_layers": 3}))),
    "mask: a directory": lambda d, w: (["apply", (d / "m.json").mkdir() or d / "m.json", w["ckpt"], d / "out"], "m.json"),
    "mask: plan options with a mask": lambda d, w: (["apply", w["mask"], w["ckpt"], d / "out", "--keep", 4], "mask.json"),
    # -- shard headers, as the safetensors format requires --
    "shard: negative dims, right element count": lambda d, w: _apply_on(_edit_header(d, w, lambda h, n: h[n].update(shape=[-x for x in h[n]["shape"]])), w, d),
    "shard: boolean dim": lambda d, w: _apply_on(_edit_header(d, w, lambda h, n: h[n].update(shape=[True, h[n]["shape"][0] * h[n]["shape"][1]])), w, d),
    "shard: float dim": lambda d, w: _apply_on(_edit_header(d, w, lambda h, n: h[n].update(shape=[float(x) for x in h[n]["shape"]])), w, d),
    "shard: string dim": lambda d, w: _apply_on(_edit_header(d, w, lambda h, n: h[n].update(shape=[str(x) for x in h[n]["shape"]])), w, d),
    "shard: metadata value not a string": lambda d, w: _apply_on(_edit_header(d, w, lambda h, n: h.update(__metadata__={"format": 1})), w, d),
    "shard: metadata a list": lambda d, w: _apply_on(_edit_header(d, w, lambda h, n: h.update(__metadata__=["pt"])), w, d),
    "shard: duplicate tensor names": lambda d, w: _apply_on(_edit_header(d, w, raw_edit=lambda t, n, h: t[:-1] + f", {json.dumps(n)}: {json.dumps(h[n])}}}"), w, d),
    "shard: trailing bytes": lambda d, w: _apply_on((lambda c: (c[0], (c[0] / c[1]).open("ab").write(b"xx") and c[1]))(_edit_header(d, w)), w, d),
    "shard: data offsets negative": lambda d, w: _apply_on(_edit_header(d, w, lambda h, n: h[n].update(data_offsets=[-1, h[n]["data_offsets"][1] - 1])), w, d),
    "verify: negative dims": lambda d, w: (["verify", _edit_header(d, w, lambda h, n: h[n].update(shape=[-x for x in h[n]["shape"]]))[0]], w["shard"]),
    # -- index and config --
    "index: weight_map value not a string": lambda d, w: (["apply", w["mask"], _edit_index(d, w, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): 3})), d / "out"], INDEX),
    "index: shard outside the checkpoint": lambda d, w: (["apply", w["mask"], _edit_index(d, w, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "../outside/x.safetensors"})), d / "out"], INDEX),
    "index: absolute shard path": lambda d, w: (["apply", w["mask"], _edit_index(d, w, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "/etc/passwd"})), d / "out"], INDEX),
    "index: tensor mapped to the wrong shard": lambda d, w: (["apply", w["mask"], _edit_index(d, w, lambda i: i["weight_map"].update({k: w["other_shard"] for k in [next(iter(i["weight_map"]))]})), d / "out"], "safetensors"),
    "index: metadata a list": lambda d, w: (["apply", w["mask"], _edit_index(d, w, lambda i: i.update(metadata=[1])), d / "out"], INDEX),
    "index: a tensor named twice": lambda d, w: (["apply", w["mask"], _index_text(d, w, lambda t: t.replace('"weight_map": {', '"weight_map": {"lm_head.weight": "x.safetensors", ', 1)), d / "out"], INDEX),
    "index: weight_map twice": lambda d, w: (["verify", _index_text(d, w, lambda t: t.rstrip()[:-1] + ', "weight_map": {}}')], INDEX),
    "index: a name that is not UTF-8": lambda d, w: (["inspect", _index_text(d, w, lambda t: t.replace('"weight_map": {', '"weight_map": {"a\udcc3": "x.safetensors", ', 1))], INDEX),
    "index: UTF-16": lambda d, w: (["verify", (lambda c: (_raw(c / INDEX, (c / INDEX).read_text().encode("utf-16")), c)[1])(_ckpt(d, w))], INDEX),
    "config: binary": lambda d, w: (["inspect", (lambda c: (_raw(c / "config.json", b"\x00\x01\x02" * 50), c)[1])(_ckpt(d, w))], "config.json"),
    "config: a JSON list": lambda d, w: (["inspect", (lambda c: (_json(c / "config.json", [1]), c)[1])(_ckpt(d, w))], "config.json"),
    "config: duplicate keys": lambda d, w: (["inspect", (lambda c: (_raw(c / "config.json", (c / "config.json").read_bytes().rstrip()[:-1] + b', "vocab_size": 4}'), c)[1])(_ckpt(d, w))], "config.json"),
    "config: num_experts_per_tok 0": lambda d, w: (["apply", w["mask"], _edit_config(d, w, num_experts_per_tok=0), d / "out"], "config.json"),
    "config: num_experts_per_tok above num_experts": lambda d, w: (["inspect", _edit_config(d, w, num_experts_per_tok=9)], "config.json"),
    # -- layout files --
    "layout: a JSON list": lambda d, w: _layout(d, w, b"[1, 2]"),
    "layout: prefix without {layer}": lambda d, w: _layout(d, w, json.dumps({**w["layout"], "layer_prefix": "model.layers."}).encode()),
    "layout: not UTF-8": lambda d, w: _layout(d, w, b'{"name": "\xe9t\xe9"}'),
    "layout: num_experts a string": lambda d, w: _layout(d, w, json.dumps({**w["layout"], "num_experts": "num_experts"}).encode()),
    "layout: a moe_layers field that is not a key name": lambda d, w: _layout(d, w, json.dumps({**w["layout"], "moe_layers": {"sparse_step": [1]}}).encode()),
    # -- saliency files --
    "saliency: negative count": _bad_sal_file(lambda d, w: _sal_with(d, w, lambda s: _layer0(s)["count"].__setitem__(0, -5.0))),
    "saliency: NaN": _bad_sal_file(lambda d, w: _raw(d / "s.json", json.dumps(_sal(w)).replace('"reap_sum": [', '"reap_sum": [NaN, ', 1).replace(", 1.0]", "]", 0).encode())),
    "saliency: tokens Infinity": _bad_sal_file(lambda d, w: _raw(d / "s.json", json.dumps(_sal(w)).replace('"tokens": ', '"tokens": Infinity, "x": ', 1).encode())),
    "saliency: 1e999": _bad_sal_file(lambda d, w: _raw(d / "s.json", json.dumps(_sal(w)).replace('"tokens": ', '"tokens": 1e999, "x": ', 1).encode())),
    "saliency: superscript digit key": _bad_sal_file(lambda d, w: _sal_with(d, w, lambda s: s["layers"].update({"²": _layer0(s)}))),
    "saliency: tokens a float": _bad_sal_file(lambda d, w: _sal_with(d, w, lambda s: _layer0(s).update(tokens=1.5))),
    "saliency: UTF-16": _bad_sal_file(lambda d, w: _raw(d / "s.json", json.dumps(_sal(w)).encode("utf-16"))),
    "saliency: a mask given to plan": lambda d, w: (["plan", w["mask"], "--keep", 4, "-o", d / "m.json"], "mask.json"),
    "plan: --preserve with a superscript digit": lambda d, w: (["plan", w["saliency"], "--keep", 4, "--preserve", "²:1", "-o", d / "m.json"], "--preserve"),
    "plan: --sparsity 1.5": lambda d, w: (["plan", w["saliency"], "--sparsity", 1.5, "-o", d / "m.json"], "--sparsity"),
    "plan: --sparsity 50 (a percentage)": lambda d, w: (["plan", w["saliency"], "--sparsity", 50, "-o", d / "m.json"], "50 is not a fraction in [0, 1); for 50% of the experts give 0.5"),
    "evaluate: --sparsity 50 (a percentage)": lambda d, w: (["evaluate", w["ckpt"], w["saliency"], "--sparsity", 50], "got 50.0 (for 50.0% of the experts give 0.5)"),
    "plan: --keep 0": lambda d, w: (["plan", w["saliency"], "--keep", 0, "-o", d / "m.json"], "--keep"),
    # -- outputs that would clobber an input, or cannot be written --
    "plan: -o its own input": lambda d, w: (["plan", (lambda p: (shutil.copy(w["saliency"], p), p)[1])(d / "s.json"), "--keep", 4, "-o", d / "s.json"], "s.json"),
    "plan: -o inside --ckpt": lambda d, w: (["plan", w["saliency"], "--keep", 4, "--ckpt", _ckpt(d, w), "-o", d / "ckpt" / "m.json"], "m.json"),
    "plan: -o a directory": lambda d, w: (["plan", w["saliency"], "--keep", 4, "-o", (d / "dir").mkdir() or d / "dir"], "dir"),
    "plan: -o in a missing directory": lambda d, w: (["plan", w["saliency"], "--keep", 4, "-o", d / "nope" / "m.json"], "m.json"),
    "merge: -o one of its inputs": lambda d, w: (["merge-saliency", (lambda p: (shutil.copy(w["saliency"], p), p)[1])(d / "a.json"), w["saliency"], "-o", d / "a.json"], "a.json"),
    "merge: the same file twice": lambda d, w: (["merge-saliency", w["saliency"], w["saliency"], "-o", d / "m.json"], "saliency.json"),
    "merge: the same contents twice": lambda d, w: (["merge-saliency", w["saliency"], (lambda p: (shutil.copy(w["saliency"], p), p)[1])(d / "copy.json"), "-o", d / "m.json"], "copy.json"),
    "apply: OUT inside CKPT": lambda d, w: (["apply", w["mask"], _ckpt(d, w), d / "ckpt" / "out"], "out"),
    "calibrate: -o CKPT/config.json": lambda d, w: (["calibrate", _ckpt(d, w), "-o", d / "ckpt" / "config.json"], "config.json"),
    "calibrate: -o inside CKPT": lambda d, w: (["calibrate", _ckpt(d, w), "-o", d / "ckpt" / "s.json"], "s.json"),
    "calibrate: -o a directory": lambda d, w: (["calibrate", w["ckpt"], "-o", (d / "dir").mkdir() or d / "dir"], "dir"),
    # -- options checked when parsed --
    "calibrate: --batch-size 0": lambda d, w: (_calibrate(d, w, "--batch-size", 0), "--batch-size"),
    "calibrate: --batch-size -1": lambda d, w: (_calibrate(d, w, "--batch-size", -1), "--batch-size"),
    "calibrate: --num-samples 0": lambda d, w: (_calibrate(d, w, "--num-samples", 0), "--num-samples"),
    "calibrate: --device tpu": lambda d, w: (_calibrate(d, w, "--device", "tpu"), "--device"),
    "calibrate: --device meta": lambda d, w: (_calibrate(d, w, "--device", "meta"), "--device"),
    "calibrate: --dtype int8": lambda d, w: (_calibrate(d, w, "--dtype", "int8"), "--dtype"),
    # -- calibrate inputs, refused before the model is built --
    "calibrate: token id == vocab_size": lambda d, w: _tokens(d, w, [1, VOCAB]),
    "calibrate: token id above 2**63": lambda d, w: _tokens(d, w, [1, 2**64]),
    "calibrate: missing checkpoint": lambda d, w: (_calibrate(d, w, ckpt=d / "nockpt"), "nockpt"),
    "calibrate: hub id not in the cache": lambda d, w: (_calibrate(d, w, ckpt="no-such-org/no-such-model@v1"), "no-such-org/no-such-model"),
    "calibrate: unknown architecture": lambda d, w: (_calibrate(d, w, ckpt=_edit_config(d, w, model_type="bogus", architectures=["BogusForCausalLM"])), "config.json"),
    "calibrate: index maps a tensor to the wrong shard": lambda d, w: (_calibrate(d, w, ckpt=_edit_index(d, w, lambda i: i["weight_map"].update({k: w["other_shard"] for k in [next(iter(i["weight_map"]))]}))), "safetensors"),
    "calibrate: messages that are token ids": lambda d, w: (_calibrate(d, w, "--dataset", _raw(d / "rows.jsonl", b'{"messages": [1, 2]}\n')), "rows.jsonl"),
    "calibrate: dataset with duplicate keys": lambda d, w: (_calibrate(d, w, "--dataset", _raw(d / "rows.jsonl", b'{"input_ids": [1], "input_ids": [2]}\n')), "rows.jsonl"),
    # -- wording: what the path is, what was expected, and the order of apply's arguments --
    "apply: a checkpoint as MASK": lambda d, w: (["apply", w["ckpt"], w["mask"], d / "out"], f"{w['ckpt']}: is a directory, not a mask or saliency file; the order is `reapsurgery apply MASK_OR_SALIENCY CKPT OUT`"),
    "apply: a mask as CKPT": lambda d, w: (["apply", w["saliency"], w["mask"], d / "out", "--keep", 4], f"{w['mask']}: is a file, not a checkpoint directory; the order is `reapsurgery apply MASK_OR_SALIENCY CKPT OUT`"),
    "apply: the checkpoint as OUT": lambda d, w: (["apply", w["mask"], d / "out", w["ckpt"]], f"{d / 'out'}: does not exist (and OUT {w['ckpt']} is a checkpoint: arguments in the wrong order? the order is"),
    "apply: OUT is CKPT": lambda d, w: (["apply", w["mask"], w["ckpt"], w["ckpt"]], f"{w['ckpt']}: output directory is the input checkpoint"),
    "apply: CKPT does not exist": lambda d, w: (["apply", w["mask"], d / "nope", d / "out"], f"{d / 'nope'}: does not exist"),
    "inspect: a shard": lambda d, w: (["inspect", Path(w["ckpt"]) / w["shard"]], f"{w['shard']}: is a safetensors file (weights), not a checkpoint directory, mask or saliency file"),
    "inspect: a path that does not exist": lambda d, w: (["inspect", d / "nope"], f"{d / 'nope'}: does not exist"),
    "verify: a path that does not exist": lambda d, w: (["verify", d / "nope"], f"{d / 'nope'}: does not exist"),
    "plan: -o -": lambda d, w: (["plan", w["saliency"], "--keep", 4, "-o", "-"], STDOUT),
    "calibrate: -o -": lambda d, w: (_calibrate(d, w)[:2] + ["-o", "-"], STDOUT),
    "merge: -o -": lambda d, w: (["merge-saliency", w["saliency"], "-o", "-"], STDOUT),
    "evaluate: -o -": lambda d, w: (["evaluate", w["ckpt"], "--mask", w["mask"], "-o", "-"], STDOUT),
    "evaluate: --plot -": lambda d, w: (["evaluate", w["ckpt"], "--mask", w["mask"], "--plot", "-"], STDOUT),
    "apply: OUT -": lambda d, w: (["apply", w["mask"], w["ckpt"], "-"], STDOUT),
    "calibrate: -o CKPT": lambda d, w: (["calibrate", _ckpt(d, w), "-o", d / "ckpt"], f"{d / 'ckpt'}: -o is the input checkpoint"),
    "inspect: binary file": lambda d, w: (["inspect", _raw(d / "x.bin", b"\x00" * 64)], "x.bin"),
    # -- config.json values of the wrong type or size, and layer counts that disagree with what is stored --
    "config: num_hidden_layers below the layers stored (apply)": _config_refused("apply", num_hidden_layers=2),
    "config: num_hidden_layers below the layers stored (verify)": _config_refused("verify", num_hidden_layers=2),
    "config: num_hidden_layers below the layers stored (inspect)": _config_refused("inspect", num_hidden_layers=2),
    "config: num_hidden_layers below the layers stored (plan --ckpt)": _config_refused("plan", num_hidden_layers=2),
    "config: num_hidden_layers below the layers stored (calibrate)": _config_refused("calibrate", num_hidden_layers=2),
    "config: num_hidden_layers above the layers stored": _config_refused("inspect", num_hidden_layers=4),
    "config: num_hidden_layers 10**9 (apply)": _config_refused("apply", num_hidden_layers=10**9),
    "config: num_hidden_layers 10**9 (inspect)": _config_refused("inspect", num_hidden_layers=10**9),
    "config: num_hidden_layers 10**30": _config_refused("verify", num_hidden_layers=10**30),
    "config: num_hidden_layers true": _config_refused("verify", num_hidden_layers=True),
    "config: architectures true": _config_refused("inspect", architectures=True),
    "config: architectures a list of numbers": _config_refused("apply", architectures=[1]),
    "config: model_type a list": _config_refused("apply", model_type=["qwen3_moe"]),
    "config: text_config a string": _config_refused("inspect", text_config="x"),
    "config: mlp_only_layers a string": _config_refused("verify", mlp_only_layers="0"),
    "config: mlp_only_layers negative": _config_refused("plan", mlp_only_layers=[-1]),
    "config: decoder_sparse_step 0": _config_refused("inspect", decoder_sparse_step=0),
    "config: decoder_sparse_step a list": _config_refused("apply", decoder_sparse_step=[1]),
    "config: without model_type (calibrate)": lambda d, w: (_calibrate(d, w, ckpt=_edit_config(d, w, model_type=...)), "config.json"),
    "config: model_type null (calibrate)": lambda d, w: (_calibrate(d, w, ckpt=_edit_config(d, w, model_type=None)), "config.json"),
    "config: vocab_size a string (calibrate)": _config_refused("calibrate", vocab_size="320"),
    "config: layers past the stack that are decoder layers (MTP family)": _mtp_config("apply", 2),
    "config: the MTP layer counted as a decoder layer": _mtp_config("inspect", 4),
    "config: MTP family, num_hidden_layers 10**9": _mtp_config("inspect", 10**9),
    # -- NaN and infinity: refused where they arise, naming the tensor's shard --
    "calibrate: NaN in a router": _poisoned("calibrate", "model.layers.0.mlp.gate.weight", float("nan")),
    "calibrate: infinity in an expert": _poisoned("calibrate", "model.layers.0.mlp.experts.3.up_proj.weight", float("inf")),
    "calibrate: NaN in the embeddings": _poisoned("calibrate", "model.embed_tokens.weight", float("nan")),
    "evaluate: infinity in a router": _poisoned("evaluate", "model.layers.0.mlp.gate.weight", float("-inf")),
    "evaluate: NaN in an expert": _poisoned("evaluate", "model.layers.1.mlp.experts.0.down_proj.weight", float("nan")),
    "evaluate: NaN in the embeddings": _poisoned("evaluate", "model.embed_tokens.weight", float("nan")),
    "evaluate: NaN in the LM head": _poisoned("evaluate", "lm_head.weight", float("nan")),
    # -- a checkpoint file apply cannot copy: an error, not a file missing from the output --
    "apply: a dangling link among the other files": _with_other_file(lambda p: p.symlink_to(p.parent / "gone")),
    "apply: a FIFO among the other files": _with_other_file(os.mkfifo),
    "apply --dry-run: a FIFO among the other files": _with_other_file(os.mkfifo, "--dry-run"),
    "apply: a link loop among the directories": lambda d, w: (["apply", w["mask"], (lambda c: ((c / "sub").mkdir(), (c / "sub" / "up").symlink_to(c), c)[2])(_ckpt(d, w)), d / "out"], "ckpt"),
    "apply: a model card that is not UTF-8": lambda d, w: (["apply", w["mask"], (lambda c: (_raw(c / "README.md", b"# card \xff\xfe"), c)[1])(_ckpt(d, w)), d / "out"], "README.md"),
    # -- layers past the decoder stack that are not MTP layers --
    "saliency: a layer past the stack, family without MTP (plan)": _bad_sal_file(lambda d, w: _sal_with(d, w, lambda s: _layer_past_stack(s, "3"))),
    "saliency: a layer past the stack, family without MTP (inspect)": lambda d, w: (["inspect", _sal_with(d, w, lambda s: _layer_past_stack(s, "3"))], "s.json"),
    "plan --ckpt: an MTP layer the checkpoint does not store": lambda d, w: (["plan", w["mtp_saliency"], "--keep", 4, "--ckpt", _without_mtp_layer(d, w), "-o", d / "m.json"], "mtp_saliency.json"),
    "saliency: layers past the stack with a gap": _bad_sal_file(lambda d, w: _sal_with(d, w, lambda s: _layer_past_stack(s, "5"))),
    "mask: a layer past the stack, family without MTP (inspect)": lambda d, w: (["inspect", _json(d / "m.json", _mask(w, layers={**_mask(w)["layers"], "3": [0, 2, 5, 7]}))], "m.json"),
    "mask: a layer far past the stack": lambda d, w: (["inspect", _json(d / "m.json", _mask(w, layers={**_mask(w)["layers"], "99999999999999999999": [0, 2, 5, 7]}))], "m.json"),
    # -- every refusal one line naming the file --
    "mask: a lone UTF-16 surrogate": _bad_mask_file(lambda d, w: _raw(d / "m.json", json.dumps(_mask(w, provenance={"method": "x\ud800"})).encode())),
    "mask: a lone surrogate in a key": _bad_mask_file(lambda d, w: _raw(d / "m.json", json.dumps(_mask(w, provenance={"\udc80": 1})).encode())),
    "mask: architecture a list": lambda d, w: (["inspect", _json(d / "m.json", _mask(w, model={**_mask(w)["model"], "architecture": ["Qwen3MoeForCausalLM"]}))], "m.json"),
    "mask: model_type a list": lambda d, w: (["inspect", _json(d / "m.json", _mask(w, model={**_mask(w)["model"], "model_type": ["qwen3_moe"]}))], "m.json"),
    "merge: samples a string": lambda d, w: (["merge-saliency", w["saliency"], _sal_with(d, w, lambda s: s["calibration"].update(samples="4")), "-o", d / "m.json"], "s.json"),
    "merge: tokens a list": lambda d, w: (["merge-saliency", w["saliency"], _sal_with(d, w, lambda s: s["calibration"].update(tokens=[100])), "-o", d / "m.json"], "s.json"),
    "merge: samples negative": lambda d, w: (["merge-saliency", w["saliency"], _sal_with(d, w, lambda s: s["calibration"].update(samples=-4)), "-o", d / "m.json"], "s.json"),
    "merge: sums that overflow a float": lambda d, w: (["merge-saliency", _sal_with(d, w, lambda s: _layer0(s)["reap_sum"].__setitem__(0, 1.5e308)), (lambda p: (shutil.copy(d / "s.json", p), _raw(p, p.read_bytes().replace(b'"samples": 4', b'"samples": 5')), p)[2])(d / "t.json"), "-o", d / "m.json"], "m.json"),
    "plan: a score that overflows a float": _bad_sal_file(lambda d, w: _sal_with(d, w, lambda s: _layer0(s)["count"].__setitem__(0, 1e-320))),
    "calibrate: --max-length 10**20": lambda d, w: (["calibrate", w["ckpt"], "-o", d / "s.json", "--max-length", 10**20], "--max-length"),
    "apply: --jobs 10**20": lambda d, w: (["apply", w["mask"], w["ckpt"], d / "out", "-j", 10**20], "--jobs"),
    "evaluate: --max-length 10**20": lambda d, w: (["evaluate", w["ckpt"], "--mask", w["mask"], "--max-length", 10**20], "--max-length"),
    "evaluate: token id past the vocabulary": lambda d, w: (["evaluate", w["ckpt"], "--mask", w["mask"], "-q", "--device", "cpu", "--dataset", _raw(d / "ids.jsonl", b'{"input_ids": [1, 2, 320]}\n')], "ids.jsonl"),
    "evaluate: --plot in a format that cannot be drawn": lambda d, w: (["evaluate", w["ckpt"], "--mask", w["mask"], "--plot", d / "q.xyz"], "q.xyz"),
    "calibrate: a shape refusal prints no note first": lambda d, w: (_calibrate(d, w, ckpt=_edit_config(d, w, moe_intermediate_size=17)), "ckpt"),
    "inspect: UTF-16 mask": lambda d, w: (["inspect", _raw(d / "m.json", json.dumps(_mask(w)).encode("utf-16"))], "m.json"),
    **OUTPUT_CASES,
}
