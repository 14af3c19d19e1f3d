"""storage/location.py on its own: a publish is a rename followed by an fsync of its directory."""

from __future__ import annotations

import os


def test_every_rename_is_followed_by_a_directory_fsync(tmp_path, monkeypatch):
    """A rename is durable only once its directory is fsynced (filesystems without ordered metadata)."""
    from ilias_ray.plan_types import Output, OutputFormat, Source, Unit
    from ilias_ray.stages.rows import State
    from ilias_ray.stages.sink import Sink
    from ilias_ray.storage.location import Location
    from ilias_ray.testing.batches import sink_batch

    IMAGE, END = State.FEATURES, State.END
    units = (Unit(0, 0, Source.TAR, "a.tar"), Unit(1, 0, Source.TAR, "b.tar"))
    output = Output(index=0, name="f.hdf5", dir=Location.of(str(tmp_path)), units=units, settings={"x": 1})

    events, dirs = [], {}
    real_replace, real_open, real_fsync = os.replace, os.open, os.fsync

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("rename", os.path.dirname(os.path.abspath(dst))))

    def open_(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        if os.path.isdir(path):
            dirs[fd] = os.path.abspath(path)
        return fd

    def fsync(fd):
        real_fsync(fd)
        if fd in dirs:
            events.append(("fsync", dirs.pop(fd)))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    sink = Sink([output], OutputFormat(dtype="float16", compression=0, per_token=False))
    sink(sink_batch([(0, p, IMAGE) for p in range(3)] + [(0, 3, END), (1, 0, IMAGE), (1, 1, END)]))
    assert (tmp_path / "f.hdf5").exists()
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) >= 7  # meta, 2 x (feat, rows, record), the file
    for i in renames:
        assert ("fsync", events[i][1]) in events[i + 1 :], f"no fsync of {events[i][1]} after rename #{i}"
