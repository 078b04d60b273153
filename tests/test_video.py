"""Short clips in a person's style (serving/clips.py): the motion, cross-frame attention, clips beside
other people's stills in one batch, MP4 out of the worker, and forget deleting them."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from helpers import produce, read_topic
from PIL import Image
from typer.testing import CliRunner

from stylestream.cli.main import app
from stylestream.demo.synthetic import make_library
from stylestream.models.tiny_style import ensure_tiny_style
from stylestream.pipelines.layout import StateLayout
from stylestream.privacy.audit import audit, needles_for
from stylestream.schemas.events import ClipRequest, GenerationRequested, parse_event
from stylestream.serving.clips import PAN_LATENT_PX, decode_mp4, encode_mp4, moved, undo_motion
from stylestream.serving.generator import Conditioning, StyleGenerator
from stylestream.serving.image_store import png_bytes
from stylestream.serving.worker import OutputStore, ServeConfig, Worker, packed
from stylestream.streams.topics import GENERATION_REQUESTS, GENERATION_RESULTS, PHOTO_EVENTS

PAN = ClipRequest(frames=5, fps=8, motion="pan_right")


def request(user: str, rid: str, clip: ClipRequest | None = None, **kw) -> GenerationRequested:
    kw = {"prompt": "a birthday card", "seed": 3, **kw}
    return GenerationRequested(event_id=f"e-{rid}", user_id=user, event_time=datetime.now(UTC), request_id=rid,
                               clip=clip, **kw)


@pytest.fixture(scope="module")
def generator(diffusion, clip):
    return StyleGenerator(diffusion, clip, device="cpu")


def test_a_pan_moves_the_picture_exactly_and_a_zoom_keeps_its_size():
    latents = torch.randn(1, 4, 8, 8)
    assert moved(latents, "pan_right", 0) is latents and moved(latents, "none", 3) is latents
    panned = moved(latents, "pan_right", 2)
    assert torch.equal(panned[..., : -2 * PAN_LATENT_PX], latents[..., 2 * PAN_LATENT_PX:])  # content went left
    image = np.random.default_rng(0).random((32, 32, 3))
    assert np.array_equal(undo_motion(np.roll(image, -2 * PAN_LATENT_PX * 4, axis=1), "pan_right", 2, 4), image)
    for zoom in ("zoom_in", "zoom_out"):
        z = moved(latents, zoom, 3)
        assert z.shape == latents.shape and not torch.allclose(z, latents)
    with pytest.raises(ValueError, match="only pans"):
        undo_motion(image, "zoom_in", 1, 4)


def test_cross_frame_attention_is_inert_without_anchors_and_reads_the_anchor_with_them(generator):
    unet = generator.pipe.unet
    x = torch.randn(3, unet.config.in_channels, 8, 8)
    text = torch.randn(3, 77, unet.config.cross_attention_dim)
    embeds = [torch.zeros(3, 1, generator.style_dim)]
    added = {"image_embeds": embeds}

    def run(anchors):
        generator.frame_anchors.rows = anchors
        try:
            with torch.inference_mode():
                return unet(x, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
        finally:
            generator.frame_anchors.rows = None
    plain = run(None)
    assert torch.equal(run(torch.arange(3)), plain)  # each row its own anchor: plain self-attention
    anchored = run(torch.zeros(3, dtype=torch.long))
    assert torch.equal(anchored[0], plain[0]) and not torch.allclose(anchored[1], plain[1])


def test_decoding_a_rolled_latent_circularly_gives_the_rolled_picture_exactly(generator):
    """Why a pan neither flickers nor shows its wrap: the decoder, wrapping around, commutes with rolls."""
    latents = torch.randn(1, generator.pipe.unet.config.in_channels, 8, 8)
    scale = generator.pipe.vae_scale_factor
    first = np.asarray(generator._decode(latents, circular=True)[0], int)
    rolled = np.asarray(generator._decode(torch.roll(latents, 3, dims=-1), circular=True)[0], int)
    assert np.abs(rolled - np.roll(first, 3 * scale, axis=1)).max() <= 1
    zero_padded = np.asarray(generator._decode(torch.roll(latents, 3, dims=-1))[0], int)
    assert np.abs(zero_padded - np.roll(first, 3 * scale, axis=1)).max() > 1
    assert all(c.padding_mode == "zeros" for c in generator.pipe.vae.decoder.modules()
               if isinstance(c, torch.nn.Conv2d))  # stills decode as before


def test_zoom_clips_of_two_people_in_one_guided_call_each_keep_their_own_style(generator):
    """Zooms are refined in a second call, all the batch's zoom frames together, with classifier-free
    guidance doubling the rows: each clip still equals itself made alone (no person's style reaches
    another's frames, and each frame reads its own clip's first frame)."""
    rng = np.random.default_rng(0)
    zoom = ClipRequest(frames=3, motion="zoom_out")
    reqs = [request("ana", "za", zoom, guidance_scale=4.0), request("ben", "zb", zoom, guidance_scale=4.0, seed=8),
            request("ben", "sb", guidance_scale=4.0, seed=8)]
    conds = [Conditioning(rng.normal(0, 3, generator.style_dim).astype(np.float32), 1.0, None) for _ in reqs]
    together = generator.generate_batch(reqs, conds)
    for r, cond, made in zip(reqs, conds, together, strict=True):
        alone = generator.generate_batch([r], [cond])[0]
        pairs = zip(made, alone, strict=True) if r.clip else [(made, alone)]
        assert max(largest(a, b) for a, b in pairs) <= 2, r.request_id
    assert largest(together[0][0], together[1][0]) > 10  # two people, two pictures
    # The refinement's pipeline itself, through all its steps (in a clip it runs only the last, where
    # a style reaching the wrong row would hardly show): each row's style is its own
    latents = torch.randn(2, generator.pipe.unet.config.in_channels, 16, 16)
    both = generator._call(generator.refine, reqs[:2], conds[:2], torch.tensor([0, 1]), image=latents, strength=0.99)
    for row in range(2):
        alone = generator._call(generator.refine, reqs[row:row + 1], conds[row:row + 1], torch.tensor([0]),
                                image=latents[row:row + 1], strength=0.99)
        assert torch.allclose(both[row], alone[0], atol=1e-3), row


def test_a_clip_is_encoded_as_mp4_with_every_frame():
    frames = [Image.fromarray(np.full((64, 48, 3), 40 * k, np.uint8)) for k in range(6)]
    decoded = decode_mp4(encode_mp4(frames, fps=8))
    assert len(decoded) == 6 and decoded[0].shape == (64, 48, 3)
    assert all(abs(f.mean() - np.asarray(im).mean()) <= 3 for f, im in zip(decoded, frames, strict=True))


def test_calls_hold_whole_clips_and_at_most_max_rows():
    class J:  # a job as packing sees it: its request's rows
        def __init__(self, rows):
            self.request = request("u", f"r{rows}", ClipRequest(frames=rows) if rows > 1 else None)
    jobs = [J(1), J(5), J(1), J(1), J(12), J(2)]
    assert [[j.request.rows for j in call] for call in packed(jobs, 8)] == [[1, 5, 1, 1], [12], [2]]


def largest(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max())


def distance(frames: list[np.ndarray], images: list[Image.Image]) -> float:
    """Mean absolute difference, in levels, between decoded frames and images."""
    pairs = zip(frames, images, strict=True)
    return float(np.mean([np.abs(f.astype(int) - np.asarray(im, int)).mean() for f, im in pairs]))


def test_a_clip_and_another_persons_still_share_a_call_each_in_its_own_style(broker, make_ingestor, generator,
                                                                             tmp_path):
    """One call makes ana's clip and ben's still; each equals what it is made alone (no style crosses
    rows); the clip reaches its person as an MP4 with its frames, a clip whose starting image is not
    its own (another person's folder) fails, and forgetting her deletes her clips."""
    bs = broker.bootstrap_servers
    photos = make_library(tmp_path / "lib", {"ana": [("a", "warm", 3)], "ben": [("b", "mono", 3)]})
    produce(bs, PHOTO_EVENTS, [p.upload_event() for p in photos])
    ingestor = make_ingestor()
    ingestor.run_until_caught_up()
    clip_request, still = request("ana", "c1", PAN), request("ben", "s1", seed=9)
    out = tmp_path / "images"
    theirs = request("ana", "c2", ClipRequest(frames=2, start_image_uri=f"file://{out}/ben/c2-reference.png"))
    produce(bs, GENERATION_REQUESTS, [clip_request, still, theirs])
    with Worker(ServeConfig(bs, str(out), max_batch=8, max_wait_ms=2000), generator) as worker:
        worker.run(max_requests=3, idle_exit_s=20)
        styles = {u: worker.styles.get(u) for u in ("ana", "ben")}
        results = {r.request_id: r for r in (parse_event(GENERATION_RESULTS, m.value)
                                             for m in read_topic(bs, GENERATION_RESULTS))}
        assert results["c1"].type == "generation_completed" and results["c1"].frames == PAN.frames
        assert results["c1"].image_uri.endswith("c1.mp4") and results["s1"].frames is None
        assert results["c1"].timings_ms["batch"] == results["s1"].timings_ms["batch"] == 2  # one call
        # a starting image in another person's folder is never read: that clip fails, with the reason
        assert results["c2"].type == "generation_failed" and "must be the request's own" in results["c2"].reason
        frames = decode_mp4((out / "ana" / "c1.mp4").read_bytes())
        assert len(frames) == PAN.frames and frames[0].shape == (64, 64, 3)

        # The same call outside the worker, with a zoom (refined with cross-frame attention) beside them:
        # each row exactly as made alone (no style crosses rows)
        zoom = request("ben", "z1", ClipRequest(frames=3, motion="zoom_in"), seed=5)
        conds = [generator.condition(clip_request, styles["ana"]), generator.condition(still, styles["ben"]),
                 generator.condition(zoom, styles["ben"])]
        clip_frames, ben_still, zoom_frames = generator.generate_batch([clip_request, still, zoom], conds)
        alone = generator.generate_batch([clip_request], conds[:1])[0]
        assert all(largest(a, b) <= 2 for a, b in zip(clip_frames, alone, strict=True))
        zoom_alone = generator.generate_batch([zoom], conds[2:])[0]
        assert len(zoom_frames) == 3 and all(largest(a, b) <= 2 for a, b in zip(zoom_frames, zoom_alone, strict=True))
        assert largest(ben_still, generator.generate(still, styles["ben"])[0]) <= 2
        assert largest(Image.open(out / "ben" / "s1.png"), ben_still) <= 2
        # ...and the MP4 holds those frames, within H.264's loss (large on the random model's colour noise,
        # which 4:2:0 chroma halves), far nearer to them than to another seed's clip
        other_seed = clip_request.model_copy(update={"seed": 4})
        other = generator.generate_batch([other_seed], conds[:1])[0]
        mine, theirs = distance(frames, alone), distance(frames, other)
        assert mine < 0.7 * theirs, (mine, theirs)

        # Forget ana: her clip goes with her images; the audit finds nothing of her
        asked = CliRunner().invoke(app, ["forget", "ana", "-b", bs])
        assert asked.exit_code == 0, asked.output
        ingestor.run_until_caught_up()
        produce(bs, GENERATION_REQUESTS, [request("ben", "s2")])  # the worker's next batch drops her first
        assert worker.run(max_requests=1, idle_exit_s=30) == 1
    assert not (out / "ana").exists() and (out / "ben" / "s1.png").exists()
    ingestor.close()
    state = StateLayout(ingestor.cfg.state_dir)
    findings = audit(state, out, needles_for(["ana"], [], state), bs, users=["ana"])
    assert [f for f in findings if f.violation] == []


def test_a_clip_starts_from_its_starting_image_in_its_persons_style(clip, tmp_path):
    """A clip asked to start from an image begins with that image redrawn (image-to-image), beside a
    still of another person in the same call; each exactly as made alone, and (with the trained tiny
    model, whose VAE reproduces pictures) two starting images give first frames each nearer its own."""
    generator = StyleGenerator(ensure_tiny_style(clip.pretrained), clip, device="cpu")
    store = OutputStore(str(tmp_path / "images"))
    pictures = {"red": Image.new("RGB", (80, 64), (220, 30, 30)), "sky": Image.new("RGB", (64, 64), (40, 90, 230))}
    rng = np.random.default_rng(1)
    embedding = rng.normal(0, 3, generator.style_dim).astype(np.float32)
    firsts = {}
    for name, picture in pictures.items():
        uri = store.store.write(store.store.reference_path("ana", f"c-{name}"), png_bytes(picture))
        clip_request = request("ana", f"c-{name}", ClipRequest(frames=3, motion="pan_right", start_image_uri=uri))
        start = store.start_image(clip_request)
        assert start.size == (64, 64)  # fitted to the request's size
        conds = [Conditioning(embedding, 1.0, None, start=start), Conditioning(-embedding, 1.0, None)]
        clip_frames, still = generator.generate_batch([clip_request, request("ben", "s", seed=9)], conds)
        alone = generator.generate_batch([clip_request], conds[:1])[0]
        assert all(largest(a, b) <= 2 for a, b in zip(clip_frames, alone, strict=True))
        assert largest(still, generator.generate_batch([request("ben", "s", seed=9)], conds[1:])[0]) <= 2
        firsts[name] = np.asarray(clip_frames[0], int)
    from_noise = generator.generate_batch([request("ana", "c", ClipRequest(frames=3))],
                                          [Conditioning(embedding, 1.0, None)])[0][0]
    assert largest(Image.fromarray(firsts["red"].astype(np.uint8)), from_noise) > 10
    for name, other in (("red", "sky"), ("sky", "red")):
        near = np.abs(firsts[name] - np.asarray(pictures[name].resize((64, 64)), int)).mean()
        far = np.abs(firsts[name] - np.asarray(pictures[other].resize((64, 64)), int)).mean()
        assert near < far, (name, near, far)
