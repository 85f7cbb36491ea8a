"""The scenes of the synthetic demo videos, drawn frame by frame and written as mpeg4 .avi.

Each video shows one, two or three copies of one shape in one colour, evenly spaced in a row and
sliding fast (wrapping around the edge) left, right, up or down within one half of the frame, on a
grey background that darkens from the first frame to the last; some videos show the shapes only in
the first or only in the second half. Why so plain: the demo's features come from randomly
initialised networks, which keep the global make-up of a frame (colour, position, area, presence)
but hardly which colour belongs to which shape, so everything in a video shares each attribute
asked about; and DualVGR cannot tell the order of the clips, so the motion shows inside one clip and
the background's brightness tells "start" from "end".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vqakd.core.files import atomic_path

COLOURS = {                      # RGB; far apart so that even random features separate them
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 20),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
TIMINGS = ("start", "end")       # transient shapes are visible in the first / the second half only
PLACES = ("top", "bottom", "left", "right")
PLACE_AXIS = {"top": ("left", "right"), "bottom": ("left", "right"), "left": ("up", "down"), "right": ("up", "down")}
# Background grey level at the first and at the last frame (it darkens linearly in between).
BACKGROUND_START = 190
BACKGROUND_END = 40

VIDEO_BIT_RATE = 2_000_000       # ample for 128x128: flat colours survive the compression

# Shape "radius" (half the side of the square), as a fraction of the frame side: as large as
# three copies allow, because area is what random features see best; the same for every count,
# so that the covered area grows with the count.
RADIUS = 0.155
# Centre of the band the copies move in, across the direction of motion, in the half of the frame
# their place names; where in that half is jittered a little.
BAND_CENTRES = {"top": 0.25, "left": 0.25, "bottom": 0.75, "right": 0.75}
BAND_JITTER = 0.05
# Distance moved per frame, as a fraction of the side: a few frames (one clip) show a clear shift.
SPEED = 0.05


@dataclass(frozen=True)
class Scene:
    """One video: `count` copies of one shape, all of one colour, direction, timing and place."""
    count: int
    shape: str
    colour: str
    direction: str
    timing: str                  # "whole", "start" or "end"
    place: str                   # the half of the frame the copies move in ("where" asks it)
    video_id: int = 0            # 0 and no starts: dealt by scene_specs, not yet placed by sample_scene
    starts: tuple[tuple[float, float], ...] = ()    # each copy's centre at the first frame (0-1)

    @property
    def clip_name(self) -> str:
        return f"shapes{self.video_id:04d}_0_3"


def sample_scene(rng: np.random.Generator, video_id: int, spec: Scene) -> Scene:
    """`spec` with its video id and its copies evenly spaced along the direction of motion, in the
    half of the frame across it that its place names."""
    dx, _ = DIRECTIONS[spec.direction]
    along = float(rng.uniform(0.0, 1.0))                 # motion wraps around: any start works
    across = BAND_CENTRES[spec.place] + float(rng.uniform(-BAND_JITTER, BAND_JITTER))
    positions = [(along + k / spec.count) % 1.0 for k in range(spec.count)]
    starts = tuple((position, across) if dx else (across, position) for position in positions)
    return replace(spec, video_id=video_id, starts=starts)


def deal(rng: np.random.Generator, values: list, n: int) -> list:
    """`n` values in random order, each of `values` equally often (the remainder drawn at random)."""
    hand = list(values) * (n // len(values))
    hand += [values[i] for i in rng.permutation(len(values))[:n % len(values)]]
    return [hand[i] for i in rng.permutation(n)]


def scene_specs(rng: np.random.Generator, n: int, transient_rate: float) -> list[Scene]:
    """What `n` videos show, each attribute dealt from a balanced deck."""
    counts = deal(rng, list(COUNT_WORDS), n)
    shapes = deal(rng, list(SHAPES), n)
    colours = deal(rng, list(COLOURS), n)
    # The place decides the axis of motion (shapes in the top or bottom half move left or
    # right): deal the places, then the directions along each place's axis, up/down first (a fixed
    # order: a set's order follows the per-process string hash; the committed figures used this one).
    places = deal(rng, list(PLACES), n)
    along = {axis: iter(deal(rng, list(axis), sum(PLACE_AXIS[p] == axis for p in places)))
             for axis in (("up", "down"), ("left", "right"))}
    directions = [next(along[PLACE_AXIS[place]]) for place in places]
    transient = int(round(transient_rate * n))
    timings = deal(rng, list(TIMINGS), transient) + ["whole"] * (n - transient)
    timings = [timings[i] for i in rng.permutation(n)]
    return [Scene(*values) for values in zip(counts, shapes, colours, directions, timings, places)]


def render_frame(scene: Scene, frame: int, num_frames: int, size: int) -> np.ndarray:
    """One RGB frame (size, size, 3) uint8."""
    progress = frame / max(num_frames - 1, 1)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = int(round(BACKGROUND_START + (BACKGROUND_END - BACKGROUND_START) * progress))
    half = num_frames // 2
    if (scene.timing == "start" and frame >= half) or (scene.timing == "end" and frame < num_frames - half):
        return image                 # a transient shape, in the half of the video it is not seen in
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    dx, dy = DIRECTIONS[scene.direction]
    shift = SPEED * frame
    for start_x, start_y in scene.starts:
        centre = (start_x + dx * shift) % 1.0, (start_y + dy * shift) % 1.0
        # Offsets from the centre on the torus, so a shape crossing an edge shows on both sides.
        off_x = (grid[None, :] - centre[0] + 0.5) % 1.0 - 0.5
        off_y = (grid[:, None] - centre[1] + 0.5) % 1.0 - 0.5
        if scene.shape == "square":
            mask = (np.abs(off_x) <= RADIUS) & (np.abs(off_y) <= RADIUS)
        elif scene.shape == "circle":
            mask = off_x ** 2 + off_y ** 2 <= RADIUS ** 2
        else:  # upright triangle inside the same box: apex at the top, base at the bottom
            rel_y = (off_y + RADIUS) / (2 * RADIUS)              # 0 at the apex, 1 at the base
            mask = (rel_y >= 0) & (rel_y <= 1) & (np.abs(off_x) <= rel_y * RADIUS)
        image[mask] = COLOURS[scene.colour]
    return image


def render_video(scene: Scene, num_frames: int, frame_size: int) -> np.ndarray:
    return np.stack([render_frame(scene, f, num_frames, frame_size) for f in range(num_frames)])


def write_video(path: str, frames: np.ndarray, fps: int) -> None:
    import av  # imported here so that the annotation helpers work without PyAV

    with atomic_path(path) as tmp:
        with av.open(tmp, mode="w", format="avi") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = VIDEO_BIT_RATE
            stream.codec_context.thread_count = 1   # same output on every machine and run
            for rgb in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
