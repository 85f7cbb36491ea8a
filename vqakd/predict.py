"""Answer questions about any video file with a trained checkpoint (predict.py).

A new video becomes features exactly as the training videos did: with the extraction settings the
checkpoint records (vqakd/training/inference_record.py) and vqakd/extraction's own extractor, from
weights files of the recorded sha256. Questions are tokenized by vqakd/data/questions.py, so a
question of the evaluation data gets validate.py's answer. Features are cached atomically under
`<checkpoint folder>/predict_cache/` (or a given folder), one `.npy` per video content (sha256)
and network settings: asking again costs the sha256 and the model's forward pass.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from vqakd.data.annotations import Video
from vqakd.training.checkpoint import load_checkpoint, model_from_checkpoint
from vqakd.training.engine import configure_backends
from vqakd.core.errors import UserError
from vqakd.core.files import atomic_open, file_sha256
from vqakd.training.inference_record import recorded_features
from vqakd.data.questions import tokenize_question
from vqakd.data.vocab import NULL_INDEX, UNK_INDEX, UNK_TOKEN, Vocabulary

from vqakd.extraction import NETWORKS, ExtractionSettings, make_extractor
from vqakd.extraction.networks import FEATURE_KINDS, MODEL_OF_KIND
from vqakd.extraction.settings import FEATURE_SETTINGS, identity_digest

DEFAULT_TOP_K = 5
CACHE_FOLDER = "predict_cache"
QUESTIONS_PER_PASS = 256          # questions about one video answered in one forward pass
# New videos are extracted this many at a time, each group cached as soon as it is done: a killed
# batch keeps all but the group in progress, and the rerun extracts only what is not cached.
VIDEOS_PER_EXTRACTION = 4
DAMAGE_SUFFIX = ".damage.txt"     # beside a cached .npy: the video's damage, as extraction reported it
NO_KNOWN_WORD = "no word of the question is in the vocabulary: the answer ignores the question text"
LAST_CHARACTER = ("the question's last character is dropped, as in the training data (which ends "
                  "questions with '?'); end it with '?'")


# ----------------------------------------------------------------------------------- settings

@dataclasses.dataclass
class ExtractionFlags:
    """Command-line settings: the weights files; the rest for a checkpoint without an extraction record."""
    appearance_weights: Optional[str] = None
    motion_weights: Optional[str] = None
    appearance_frames: Optional[int] = None
    motion_frames: Optional[int] = None
    appearance_size: Optional[tuple[int, int]] = None
    motion_size: Optional[tuple[int, int]] = None
    motion_normalisation: Optional[str] = None      # "raw" or "kinetics-mean"
    random_weights: Optional[bool] = None
    seed: Optional[int] = None                       # of --random-weights; 0 where not given
    vocab: Optional[str] = None


FLAG_NAMES = {"appearance_frames": "--appearance-frames-per-clip", "motion_frames": "--motion-frames-per-clip",
              "appearance_size": "--appearance-image-size", "motion_size": "--motion-image-size",
              "motion_normalisation": "--motion-normalisation"}


def settings_from_flags(flags: ExtractionFlags, num_clips: int, path: str) -> dict[str, dict]:
    """Both networks' settings from the flags, for a checkpoint without a record of them."""
    missing = [name for key, name in FLAG_NAMES.items() if getattr(flags, key) is None]
    if missing:
        raise UserError(f"{path} does not record how its features were extracted (made before predict.py, or "
                        f"by the original code); give the settings of its feature files: missing "
                        f"{', '.join(missing)} (and --random-weights if they came from random networks)")
    result = {}
    for kind in FEATURE_KINDS:
        height, width = getattr(flags, f"{kind}_size")
        result[kind] = {
            "model": MODEL_OF_KIND[kind], "num_clips": num_clips, "frames_per_clip": getattr(flags, f"{kind}_frames"),
            "image_height": height, "image_width": width, "precision": "fp32", "weights_sha256": None,
            "kinetics_mean": kind == "motion" and flags.motion_normalisation == "kinetics-mean",
            "random_weights": bool(flags.random_weights),
            "random_seed": (flags.seed or 0) if flags.random_weights else None}
    return result


def check_recorded(record: Mapping[str, Any], flags: ExtractionFlags, num_clips: int, path: str) -> None:
    """The record must fit the model, and settings flags next to it may only repeat it (one source of truth)."""
    for kind in FEATURE_KINDS:
        settings = record[kind]
        if settings.get("model") != MODEL_OF_KIND[kind]:
            raise UserError(f"{path}: {kind} features recorded as made by {settings.get('model')!r}, "
                            f"expected {MODEL_OF_KIND[kind]}")
        if int(settings["num_clips"]) != num_clips:
            raise UserError(f"{path}: {kind} features have {settings['num_clips']} clips but the model "
                            f"was built for {num_clips}")
        height, width = getattr(flags, f"{kind}_size") or (None, None)
        normalisation = flags.motion_normalisation if kind == "motion" else None
        given = {"frames_per_clip": getattr(flags, f"{kind}_frames"), "image_height": height, "image_width": width,
                 "kinetics_mean": None if normalisation is None else normalisation == "kinetics-mean",
                 "random_weights": flags.random_weights}
        for key, value in given.items():     # None: not given
            if value is not None and settings.get(key) != value:
                raise UserError(f"{path} records {kind} features extracted with {key}={settings.get(key)!r}, "
                                f"not {value!r}; leave the flag out (the checkpoint's settings are used)")
        if flags.seed is not None and settings["random_seed"] != flags.seed:
            made = (f"random networks of seed {settings['random_seed']}" if settings["random_seed"] is not None
                    else "pretrained networks, where --seed does nothing")
            raise UserError(f"{path} records {kind} features made by {made}, not seed {flags.seed}; leave "
                            "--seed out (the checkpoint's settings are used)")


# ----------------------------------------------------------------------------------- vocabulary

def question_vocab(checkpoint: Mapping[str, Any], flags: ExtractionFlags, model_config, path: str) -> Vocabulary:
    recorded = (checkpoint.get("inference") or {}).get("vocabulary")
    if recorded and flags.vocab is None:
        vocab = Vocabulary(dict(recorded["question_token_to_idx"]), dict(recorded["answer_token_to_idx"]))
    else:
        info = checkpoint.get("vocab") or {}
        vocab_path = flags.vocab or info.get("path")
        if not vocab_path or not os.path.isfile(vocab_path):
            where = f" (it was trained with {vocab_path}, not found)" if vocab_path else ""
            raise UserError(f"{path} does not hold its vocabulary{where}; give the vocabulary file with --vocab")
        if info.get("sha256") and file_sha256(vocab_path) != info["sha256"]:
            raise UserError(f"{vocab_path}: not the vocabulary {path} was trained with (sha256 differs)")
        vocab = Vocabulary.load(vocab_path)
    if (len(vocab.question_token_to_idx), len(vocab.idx_to_answer)) != (
            model_config.question_vocab_size, model_config.answer_vocab_size):
        raise UserError(f"{path}: the vocabulary has {len(vocab.question_token_to_idx)} question words and "
                        f"{len(vocab.idx_to_answer)} answers, the model {model_config.question_vocab_size} and "
                        f"{model_config.answer_vocab_size}")
    return vocab


@dataclasses.dataclass
class EncodedQuestion:
    indices: list[int]
    unknown: list[str]
    warnings: list[str]


def encode_question(text: str, vocab: Vocabulary) -> EncodedQuestion:
    """Tokens and indices exactly as preprocess/preprocess_questions.py makes them."""
    tokens = tokenize_question(text)
    indices = vocab.encode_question(tokens)
    unknown = [token for token, index in zip(tokens, indices) if index == UNK_INDEX and token != UNK_TOKEN]
    warnings = []
    if text and text[-1].isalnum():
        warnings.append(LAST_CHARACTER)
    if all(index in (UNK_INDEX, NULL_INDEX) for index in indices):     # also without any token
        warnings.append(NO_KNOWN_WORD)
    if not indices:
        indices = [UNK_INDEX]   # the model needs one token; an unknown word says nothing either
    return EncodedQuestion(indices, unknown, warnings)


# ----------------------------------------------------------------------------------- features

class FeatureCache:
    """`<folder>/<sha[:2]>/<video sha256>.<kind>.<settings digest>.npy`, written atomically."""

    def __init__(self, folder: str, settings: Mapping[str, dict]):
        self.folder = folder
        # Fixed for one checkpoint and its flags: what names each kind's features, and their shape.
        self.digests = {kind: identity_digest(settings[kind], FEATURE_SETTINGS) for kind in FEATURE_KINDS}
        self.shapes = {kind: NETWORKS[settings[kind]["model"]].shape_for(int(settings[kind]["num_clips"]),
                                                                         int(settings[kind]["frames_per_clip"]))
                       for kind in FEATURE_KINDS}

    def path(self, video_sha: str, kind: str) -> str:
        return os.path.join(self.folder, video_sha[:2], f"{video_sha}.{kind}.{self.digests[kind][:20]}.npy")

    def get(self, video_sha: str, kind: str) -> Optional[tuple[np.ndarray, Optional[str]]]:
        """The cached features and the damage extraction reported for them, so that cached answers
        warn as the first one did; None when none are usable."""
        path = self.path(video_sha, kind)
        if not os.path.isfile(path):
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None     # unreadable: extracted again and rewritten
        if array.shape != self.shapes[kind] or array.dtype != np.float32:
            return None
        if not os.path.isfile(path + DAMAGE_SUFFIX):
            return array, None
        with open(path + DAMAGE_SUFFIX, encoding="utf-8") as handle:
            return array, handle.read().strip() or None

    def put(self, video_sha: str, kind: str, array: np.ndarray, damage: Optional[str] = None) -> None:
        path = self.path(video_sha, kind)
        try:
            if damage:              # first: cached features never appear without their warning
                with atomic_open(path + DAMAGE_SUFFIX, "w", encoding="utf-8") as handle:
                    handle.write(damage)
            with atomic_open(path, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        except OSError as exc:
            raise UserError(f"cannot write the feature cache {path} ({exc.strerror or exc}); choose "
                            "another --cache-dir or pass --no-cache") from None


@dataclasses.dataclass
class VideoFeatures:
    appearance: np.ndarray
    motion: np.ndarray
    cached: bool
    seconds: float
    warnings: list = dataclasses.field(default_factory=list)   # damage extraction found in the file


# ----------------------------------------------------------------------------------- the answerer

class Answerer:
    """A checkpoint, its extraction settings and vocabulary, ready to answer questions."""

    def __init__(self, checkpoint_path: str, device: torch.device, flags: ExtractionFlags | None = None,
                 cache_dir: Optional[str] = None, use_cache: bool = True, top_k: int = DEFAULT_TOP_K,
                 batch_size: int | None = None):
        flags = flags or ExtractionFlags()
        if top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {top_k}")
        self.path = checkpoint_path
        self.device = device
        self.flags = flags
        checkpoint = load_checkpoint(checkpoint_path)
        self.model = model_from_checkpoint(checkpoint, checkpoint_path, device).eval()
        config = self.model.config
        self.settings = recorded_features(checkpoint, checkpoint_path)
        if len(self.settings) == len(FEATURE_KINDS):
            check_recorded(self.settings, flags, config.num_nodes, checkpoint_path)
        else:
            self.settings = settings_from_flags(flags, config.num_nodes, checkpoint_path)
        self.vocab = question_vocab(checkpoint, flags, config, checkpoint_path)
        self.top_k = min(top_k, len(self.vocab.idx_to_answer))
        self.batch_size = batch_size
        # The run's train.tf32 and train.amp, as validate.py uses them: the same probabilities.
        train = (checkpoint.get("config") or {}).get("train") or {}
        self.tf32 = bool(train.get("tf32", True))
        self.amp = str(train.get("amp", "none"))
        folder = cache_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), CACHE_FOLDER)
        self.cache = FeatureCache(folder, self.settings) if use_cache else None     # None: --no-cache
        self._extractors: dict[str, Any] = {}

    # ----- features ------------------------------------------------------------------------------

    def extractor(self, kind: str):
        """The kind's extractor, built on first need (a fully cached run never reads weights)."""
        if kind not in self._extractors:
            settings = self.settings[kind]
            weights = getattr(self.flags, f"{kind}_weights")
            if settings.get("random_weights") and weights:
                raise UserError(f"{self.path}: its {kind} features came from a randomly initialised network; "
                                f"--{kind}-weights does not apply")
            if weights is None and settings.get("weights") and os.path.isfile(str(settings["weights"])):
                weights = str(settings["weights"])
            extraction = dataclasses.replace(ExtractionSettings.from_record(settings),
                                             weights=None if settings.get("random_weights") else weights)
            extractor = make_extractor(extraction, self.device, self.batch_size, num_workers=0, progress=False)
            recorded = settings.get("weights_sha256")
            if recorded and extractor.weights.sha256 != recorded:
                raise UserError(
                    f"{extractor.weights.path}: sha256 {extractor.weights.sha256} differs from the weights the "
                    f"checkpoint's {kind} features were made with ({settings.get('weights') or 'unknown path'}, "
                    f"sha256 {recorded}); give that file with --{kind}-weights")
            self._extractors[kind] = extractor
        return self._extractors[kind]

    def features(self, videos: Sequence[str]) -> dict[str, VideoFeatures | str]:
        """Features of each distinct video (cached, else extracted and cached a group at a time), or why
        it cannot be used."""
        result: dict[str, VideoFeatures | str] = {}
        found: dict[str, dict[str, tuple[np.ndarray, Optional[str]]]] = {}    # kind → (features, damage)
        shas: dict[str, str] = {}
        for video in dict.fromkeys(videos):
            if not os.path.isfile(video):
                result[video] = f"not a file: {video}" if os.path.exists(video) else f"video not found: {video}"
                continue
            try:
                shas[video] = file_sha256(video)
            except OSError as exc:
                result[video] = f"{video}: cannot read it ({exc.strerror or exc})"
                continue
            cached = {kind: self.cache.get(shas[video], kind) for kind in FEATURE_KINDS} if self.cache else {}
            found[video] = {kind: entry for kind, entry in cached.items() if entry is not None}
        timings = dict.fromkeys(found, 0.0)
        for kind in FEATURE_KINDS:
            todo = [video for video in found if kind not in found[video] and video not in result]
            for start in range(0, len(todo), VIDEOS_PER_EXTRACTION):
                group = todo[start:start + VIDEOS_PER_EXTRACTION]
                started = time.perf_counter()
                extracted = self._extract(kind, group)
                share = (time.perf_counter() - started) / len(group)
                for video in group:
                    timings[video] += share
                    if isinstance(extracted[video], str):
                        result[video] = extracted[video]
                    else:
                        found[video][kind] = extracted[video]
                        if self.cache:
                            self.cache.put(shas[video], kind, *extracted[video])
        for video, entries in found.items():
            if video not in result:
                damage = sorted({reason for _, reason in entries.values() if reason})
                result[video] = VideoFeatures(entries["appearance"][0], entries["motion"][0], timings[video] == 0.0,
                                              timings[video], [f"damaged video: {reason}" for reason in damage])
        return {video: result[video] for video in dict.fromkeys(videos)}

    def _extract(self, kind: str, paths: Sequence[str]) -> dict[str, tuple[np.ndarray, Optional[str]] | str]:
        """Each video's features and the damage extraction found in the file, or why it failed."""
        videos = [Video(index, os.path.basename(path), path) for index, path in enumerate(paths)]
        ids, features, failures, damaged = self.extractor(kind).extract(videos)
        reasons = {record["video_id"]: record["reason"] for record in damaged}
        result: dict[str, tuple[np.ndarray, Optional[str]] | str] = {
            paths[i]: (row, reasons.get(i)) for i, row in zip(ids, features)}
        for failure in failures:
            path = paths[failure["video_id"]]
            result[path] = f"{path}: cannot use this video ({failure['reason']})"
        return result

    # ----- answering -----------------------------------------------------------------------------

    @torch.inference_mode()
    def answer_encoded(self, features: VideoFeatures, questions: Sequence[EncodedQuestion]) -> list[list[tuple[str, float]]]:
        """Top-k (answer, probability) of each question about one video, in one forward pass."""
        count = len(questions)
        tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(q.indices, dtype=torch.long) for q in questions],
                                                 batch_first=True, padding_value=NULL_INDEX)
        lengths = torch.tensor([len(q.indices) for q in questions], dtype=torch.long)
        appearance, motion = (torch.from_numpy(array).to(self.device).expand(count, *array.shape).contiguous()
                              for array in (features.appearance, features.motion))
        configure_backends(self.device, self.tf32)      # each call: the feature extractors switch TF32 off
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            logits = self.model(appearance, motion, tokens.to(self.device), lengths).logits.float()
        probabilities = torch.softmax(logits, dim=1)
        top = probabilities.topk(self.top_k, dim=1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [[(self.vocab.idx_to_answer[i], float(p)) for i, p in zip(row_i, row_p)]
                for row_i, row_p in zip(indices, values)]

    def answer(self, video: str, question: str) -> dict[str, Any]:
        """One question about one video (as answer_many); a video that cannot be used is a UserError."""
        result = self.answer_many([{"video": video, "question": question}])[0]
        if isinstance(result, str):
            raise UserError(result)
        return result

    def answer_many(self, rows: Sequence[Mapping[str, str]]) -> list[dict[str, Any] | str]:
        """Each row's answer (the record --json prints), or the reason it failed; every distinct video
        is extracted once."""
        features = self.features([row["video"] for row in rows])
        by_video: dict[str, list[int]] = {}
        results: list[dict[str, Any] | str] = [""] * len(rows)
        for index, row in enumerate(rows):
            if isinstance(features[row["video"]], str):
                results[index] = features[row["video"]]
            else:
                by_video.setdefault(row["video"], []).append(index)
        for video, indices in by_video.items():
            feats = features[video]
            # In passes of QUESTIONS_PER_PASS: memory is bounded by that, not by how many
            # questions one video has (10,000 rows about one video took 11 GB in one pass).
            for start in range(0, len(indices), QUESTIONS_PER_PASS):
                chunk = indices[start:start + QUESTIONS_PER_PASS]
                encoded = [encode_question(rows[i]["question"], self.vocab) for i in chunk]
                for i, question, answers in zip(chunk, encoded, self.answer_encoded(feats, encoded)):
                    results[i] = {"video": video, "question": rows[i]["question"],
                                  "answers": [{"answer": a, "probability": p} for a, p in answers],
                                  "unknown_words": question.unknown, "warnings": question.warnings + feats.warnings,
                                  "features_cached": feats.cached, "extract_seconds": round(feats.seconds, 4)}
        return results


def format_answer(answer: Mapping[str, Any]) -> str:
    lines = [f"{answer['video']}: {answer['question']}"]
    if answer["unknown_words"]:
        lines.append(f"  not in the vocabulary (read as <UNK>): {', '.join(answer['unknown_words'])}")
    lines += [f"  warning: {warning}" for warning in answer["warnings"]]
    width = max(len(entry["answer"]) for entry in answer["answers"])
    lines += [f"  {rank}. {entry['answer']:<{width}}  {entry['probability']:.4f}"
              for rank, entry in enumerate(answer["answers"], 1)]
    source = ("cached features" if answer["features_cached"]
              else f"features extracted in {answer['extract_seconds']:.2f} s")
    lines.append(f"  ({source})")
    return "\n".join(lines)
