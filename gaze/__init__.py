"""gaze: find the attention heads of a VLM that look where it is describing, and move them.

Modules, in the order a reader needs them:
    regions     image tokens -> pixel cells -> panels and boxes (pure)
    attention   the "gaze_sdpa" attention: capture rows, add biases, on fused SDPA
    scoring     per-strip [layers, heads, R, R] attention mass, gaze scores
    discovery   many strips -> a Ranking (resumable, shardable)
    ranking     the Ranking artifact (JSON)
    steering    the `steer` context manager, targets and schedules
    tracking    where the chosen heads look at every step
    generation  ask + steer + track in one call
    families    per-family image-token layout and positions
    models      loading (hub id, folder, or "organism")
    strips      the Strip type, stitching, strip sources
"""

from gaze.generation import Generation, generate
from gaze.models import Loaded, load
from gaze.ranking import Head, Ranking
from gaze.regions import ImageLayout, RegionMap
from gaze.steering import Box, Panel, Schedule, Tokens, parse_schedule, steer
from gaze.strips import Strip, load_strips, stitch_panels
from gaze.tracking import Tracker

__all__ = [
    "Box", "Generation", "Head", "ImageLayout", "Loaded", "Panel", "Ranking", "RegionMap", "Schedule", "Strip",
    "Tokens", "Tracker", "generate", "load", "load_strips", "parse_schedule", "steer", "stitch_panels",
]
