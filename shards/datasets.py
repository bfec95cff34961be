"""
Dataset tables (joint names, flip pairs) and readers that turn each public annotation format
into a list of Records: one person each, keypoints in original image pixels, 0-based.

Readers return (records, skipped, report): per-person problems (crowd, too few keypoints, wrong joint
count) become `skipped` entries; `report` holds extra manifest fields (COCO: images listed but missing).
A file that cannot be parsed raises AnnotationError naming file and field.
Images are opened later, by the writer, where missing/corrupt files are skipped and counted.
"""

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import scipy.io

# -----------------------------------------------------------------------------
# one table per dataset


@dataclass(frozen=True)
class Dataset:
    name: str
    joints: tuple  # joint names in the dataset's own order
    flip_pairs: tuple  # (left, right) index pairs swapped by a horizontal flip
    skeleton: tuple = ()  # (a, b) index pairs of the limbs drawn
    oks_sigmas: tuple = ()  # per-joint OKS sigmas for COCO keypoint AP (empty: not a COCO-style set)


LSP_JOINTS = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
    "neck", "head_top",
)
LSP_FLIP_PAIRS = ((0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9))

MPII_JOINTS = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "pelvis", "thorax", "upper_neck", "head_top",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
)
MPII_FLIP_PAIRS = ((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13))

COCO_JOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))

LSP_SKELETON = ((0, 1), (1, 2), (3, 4), (4, 5), (2, 3), (2, 8), (3, 9), (6, 7), (7, 8), (9, 10), (10, 11),
                (8, 12), (9, 12), (12, 13))
MPII_SKELETON = ((0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9), (10, 11), (11, 12),
                 (12, 7), (7, 13), (13, 14), (14, 15))
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                 (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
# pycocotools' sigmas for the 17 COCO keypoints (COCOeval.Params.kpt_oks_sigmas), by name; a joint of
# another set takes its COCO namesake's, or DEFAULT_OKS_SIGMA (about the mean of COCO's body joints)
COCO_OKS_SIGMAS = dict(zip(COCO_JOINTS, (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87,
                                         .89, .89)))
COCO_OKS_SIGMAS = {k: v / 10.0 for k, v in COCO_OKS_SIGMAS.items()}
DEFAULT_OKS_SIGMA = 0.08

SKELETONS = {14: LSP_SKELETON, 16: MPII_SKELETON, 17: COCO_SKELETON}  # by joint count, for manifests without one


def skeleton_for(num_joints: int) -> list[tuple[int, int]]:
    return list(SKELETONS.get(num_joints, []))


DATASETS = {
    "lsp": Dataset("lsp", LSP_JOINTS, LSP_FLIP_PAIRS, LSP_SKELETON),
    "lspet": Dataset("lspet", LSP_JOINTS, LSP_FLIP_PAIRS, LSP_SKELETON),
    "mpii": Dataset("mpii", MPII_JOINTS, MPII_FLIP_PAIRS, MPII_SKELETON),
    "coco": Dataset("coco", COCO_JOINTS, COCO_FLIP_PAIRS, COCO_SKELETON, tuple(COCO_OKS_SIGMAS[j] for j in COCO_JOINTS)),
}

SIDES = (("left", "right"), ("l", "r"))


def mirror_name(name):
    """The name of the joint a horizontal flip swaps `name` with, or None: a left/right token
    (left/right or l/r, any case, split by _ - . or space, at either end) exchanged."""
    tokens = re.split(r"([_\-. ]+)", name)
    for i in (0, len(tokens) - 1):
        low = tokens[i].lower()
        for a, b in SIDES:
            if low in (a, b):
                other = b if low == a else a
                other = other.upper() if tokens[i].isupper() else other.capitalize() if tokens[i][0].isupper() else other
                return "".join(tokens[:i] + [other] + tokens[i + 1:])
        if low.startswith(("left", "right")) and len(tokens) == 1:  # leftShoulder / rightshoulder
            side = "left" if low.startswith("left") else "right"
            rest = name[len(side):]
            other = "right" if side == "left" else "left"
            return (other.capitalize() if name[0].isupper() else other) + rest
    return None


def flip_pairs_from_names(joints):
    """(i, j) pairs of joints whose names differ only in their side; each joint at most once."""
    index = {name: i for i, name in enumerate(joints)}
    pairs = []
    for i, name in enumerate(joints):
        j = index.get(mirror_name(name) or "")
        if j is not None and i < j:
            pairs.append((i, j))
    return tuple(pairs)


def parse_flip_pairs(text, joints):
    """--flip-pairs "a:b,c:d" with joint names or 0-based indices -> ((i, j), ...), checked."""
    pairs, used = [], set()
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            a, b = (x.strip() for x in item.split(":"))
            ia, ib = (int(x) if x.isdigit() else joints.index(x) for x in (a, b))
        except ValueError:
            raise ValueError(f"--flip-pairs {text!r}: {item!r} is not NAME:NAME or I:J of the joints "
                             f"{list(joints)}") from None
        if not (0 <= ia < len(joints) and 0 <= ib < len(joints)) or ia == ib or {ia, ib} & used:
            raise ValueError(f"--flip-pairs {text!r}: {item!r} pairs joints out of range, itself, or twice")
        used |= {ia, ib}
        pairs.append((ia, ib))
    return tuple(pairs)


def coco_dataset(annotations, name="coco", flip_pairs=None, oks_sigmas=None):
    """The Dataset table of a COCO-format keypoint file: joints and skeleton from the person category
    (`categories[].keypoints`, 1-based `skeleton`), flip pairs from the names' left/right tokens
    (or --flip-pairs), OKS sigmas by name from COCO's (or --oks-sigmas)."""
    data = _load_json(annotations)
    cats = [c for c in data.get("categories", []) if isinstance(c, dict) and c.get("keypoints")] \
        if isinstance(data, dict) else []
    if not cats:
        raise AnnotationError(f"{annotations}: no category with 'keypoints' in field 'categories'")
    joints = tuple(str(j) for j in cats[0]["keypoints"])
    skeleton = []
    for pair in cats[0].get("skeleton") or []:
        try:
            a, b = (int(v) - 1 for v in pair)
        except (TypeError, ValueError):
            raise AnnotationError(f"{annotations}: categories[0].skeleton holds {pair!r}, expected [a, b]") from None
        if 0 <= a < len(joints) and 0 <= b < len(joints):
            skeleton.append((a, b))
    pairs = parse_flip_pairs(flip_pairs, joints) if flip_pairs else flip_pairs_from_names(joints)
    if oks_sigmas:
        try:
            sigmas = tuple(float(v) for v in oks_sigmas.split(","))
        except ValueError:
            raise ValueError(f"--oks-sigmas {oks_sigmas!r}: expected comma-separated numbers") from None
        if len(sigmas) != len(joints) or min(sigmas) <= 0:
            raise ValueError(f"--oks-sigmas gives {len(sigmas)} values > 0; the set has {len(joints)} joints")
    else:
        sigmas = tuple(COCO_OKS_SIGMAS.get(j.lower().replace("-", "_").replace(" ", "_"), DEFAULT_OKS_SIGMA)
                       for j in joints)
    return Dataset(name, joints, pairs, tuple(skeleton), sigmas)

# -----------------------------------------------------------------------------
# records


@dataclass
class Record:
    """One person to become one sample. Keypoints may still hold junk; the writer cleans them."""
    key: str  # member name stem in the tar, e.g. "lspet_000001"
    idx: int  # sample id, unique within the dataset
    image: str  # path of the source image
    keypoints: np.ndarray  # (J, 3) float64: x, y, v (0 = not labelled, >0 = labelled)
    box: list | None = None  # x0, y0, w, h; None = tight box of the labelled joints
    center: list | None = None  # None = centre of the box
    scale: float | None = None  # person height / 200 px; None = box height / 200
    head_box: list | None = None  # x0, y0, w, h (MPII, for PCKh)
    source_id: object = None  # id of the image/annotation in the source
    extra: dict = field(default_factory=dict)  # anything else worth keeping in the .json


class AnnotationError(ValueError):
    """An annotation file that cannot be used as a whole; the message names file and field."""


def parse_range(text):
    """'FIRST:LAST' (1-based, inclusive) -> (first, last); None -> (1, None)."""
    if text is None:
        return 1, None
    try:
        first, last = (int(s) for s in text.split(":"))
    except ValueError:
        raise ValueError(f"--range must be FIRST:LAST with integers, got {text!r}") from None
    if not 1 <= first <= last:
        raise ValueError(f"--range {text}: need 1 <= FIRST <= LAST")
    return first, last


def read_split_file(path):
    """A split file: image file names, one a line ('#' comments and blank lines ignored) -> set."""
    try:
        with open(path) as f:
            lines = [line.split("#")[0].strip() for line in f]
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read split file ({e.strerror})") from None
    names = {os.path.basename(line) for line in lines if line}
    if not names:
        raise AnnotationError(f"{path}: split file lists no images")
    return names


def _skip(source, reason):
    return {"source": str(source), "reason": reason}


# -----------------------------------------------------------------------------
# LSP and LSPET


def _load_mat_joints(path):
    """The 'joints' variable of an LSP-style joints.mat, as float64."""
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: file not found")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a damaged file
        raise AnnotationError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None
    if "joints" not in mat:
        names = sorted(k for k in mat if not k.startswith("__"))
        raise AnnotationError(f"{path}: no variable 'joints' (found {names})")
    joints = mat["joints"]
    if not np.issubdtype(joints.dtype, np.number):
        raise AnnotationError(f"{path}: field 'joints' is {joints.dtype}, expected numbers")
    return joints.astype(np.float64)


def _lsp_records(dataset, root, joints, name_format, first, last):
    """joints: (N, 14, 3) with v = labelled; images root/images/name_format.format(i)."""
    n = joints.shape[0]
    last = n if last is None else last
    if last > n:
        raise ValueError(f"--range asks for image {last} but the annotation has {n}")
    records = []
    for i in range(first, last + 1):
        records.append(Record(
            key=f"{dataset}_{i:06d}",
            idx=i,
            image=os.path.join(root, "images", name_format.format(i)),
            keypoints=joints[i - 1],
            source_id=name_format.format(i),
        ))
    return records, [], {}


def read_lspet(root, first=1, last=None):
    """LSPET: joints.mat 'joints' (14, 3, N), axis 1 = x, y, visible; images im00001.jpg ..."""
    path = os.path.join(root, "joints.mat")
    joints = _load_mat_joints(path)
    if joints.ndim != 3 or joints.shape[:2] != (14, 3):
        raise AnnotationError(f"{path}: field 'joints' has shape {joints.shape}, expected (14, 3, N) for LSPET "
                              f"(the original LSP has (3, 14, N): use 'shard lsp')")
    return _lsp_records("lspet", root, joints.transpose(2, 0, 1), "im{:05d}.jpg", first, last)


def read_lsp(root, first=1, last=None):
    """Original LSP: joints.mat 'joints' (3, 14, N), row 2 = INVISIBILITY (1 = occluded); im0001.jpg ..."""
    path = os.path.join(root, "joints.mat")
    joints = _load_mat_joints(path)
    if joints.ndim != 3 or joints.shape[:2] != (3, 14):
        raise AnnotationError(f"{path}: field 'joints' has shape {joints.shape}, expected (3, 14, N) for LSP "
                              f"(LSPET has (14, 3, N): use 'shard lspet')")
    joints = joints.transpose(2, 1, 0).copy()  # (N, 14, 3)
    joints[:, :, 2] = 1.0 - joints[:, :, 2]  # invisibility -> labelled
    return _lsp_records("lsp", root, joints, "im{:04d}.jpg", first, last)


# -----------------------------------------------------------------------------
# MPII


def _load_json(path):
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e})") from None


def _field(path, where, obj, name):
    if not isinstance(obj, dict) or name not in obj:
        raise AnnotationError(f"{path}: {where} has no field '{name}'")
    return obj[name]


def read_mpii_json(images, annotations):
    """The common MPII JSON: a list of {image, center, scale, joints (16 x [x, y]), joints_vis (16)}.
    Coordinates are 1-based (MATLAB) and are shifted to 0-based here."""
    data = _load_json(annotations)
    if not isinstance(data, list):
        raise AnnotationError(f"{annotations}: expected a list of person records, got {type(data).__name__}")
    records, skipped = [], []
    for i, rec in enumerate(data):
        where = f"record {i}"
        image = _field(annotations, where, rec, "image")
        joints = _field(annotations, where, rec, "joints")
        vis = _field(annotations, where, rec, "joints_vis")
        center = _field(annotations, where, rec, "center")
        scale = _field(annotations, where, rec, "scale")
        source = f"{annotations}#{i} ({image})"
        try:
            joints = np.asarray(joints, dtype=np.float64)
            vis = np.asarray(vis, dtype=np.float64)
            center = np.asarray(center, dtype=np.float64)
            scale = float(scale)
        except (TypeError, ValueError):
            raise AnnotationError(f"{annotations}: {where} has non-numeric joints/joints_vis/center/scale") from None
        if joints.shape != (16, 2) or vis.shape != (16,):
            skipped.append(_skip(source, f"wrong joint count: joints {joints.shape}, joints_vis {vis.shape}, expected (16, 2) and (16,)"))
            continue
        if center.shape != (2,) or not np.isfinite(center).all() or not np.isfinite(scale) or scale <= 0:
            skipped.append(_skip(source, f"bad center {center.tolist()} or scale {scale}"))
            continue
        kp = np.concatenate([joints - 1.0, vis[:, None]], axis=1)
        center = center - 1.0
        size = scale * 200.0  # MPII scale: person height / 200 px
        records.append(Record(
            key=f"mpii_{i:06d}",
            idx=i,
            image=os.path.join(images, image),
            keypoints=kp,
            box=[center[0] - size / 2, center[1] - size / 2, size, size],
            center=center.tolist(),
            scale=scale,
            source_id=image,
        ))
    return records, skipped, {}


def _mat_list(x):
    """scipy squeezes 1-element struct arrays to a scalar struct: always give a list."""
    if isinstance(x, np.ndarray):
        return list(x.ravel())
    return [x]


def read_mpii_mat(images, annotations):
    """The official mpii_human_pose_v1_u12_1.mat (RELEASE.annolist): one sample per annotated person
    (annorect with annopoints), head box (x1, y1, x2, y2) kept for PCKh. 1-based -> 0-based."""
    if not os.path.isfile(annotations):
        raise AnnotationError(f"{annotations}: file not found")
    try:
        mat = scipy.io.loadmat(annotations, struct_as_record=False, squeeze_me=True)
    except Exception as e:
        raise AnnotationError(f"{annotations}: not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None
    if "RELEASE" not in mat:
        raise AnnotationError(f"{annotations}: no variable 'RELEASE'")
    release = mat["RELEASE"]
    if not hasattr(release, "annolist"):
        raise AnnotationError(f"{annotations}: field 'RELEASE.annolist' missing")
    annolist = _mat_list(release.annolist)
    is_train = _mat_list(getattr(release, "img_train", [None] * len(annolist)))
    records, skipped, person = [], [], 0
    for i, anno in enumerate(annolist):
        try:
            name = anno.image.name
        except AttributeError:
            raise AnnotationError(f"{annotations}: RELEASE.annolist({i + 1}).image.name missing") from None
        rects = _mat_list(anno.annorect) if hasattr(anno, "annorect") else []
        for r, rect in enumerate(rects):
            points = getattr(rect, "annopoints", None)
            if not hasattr(points, "point"):
                continue  # persons without joint annotation (test set, group shots): not samples
            idx, person = person, person + 1
            source = f"{annotations}#annolist({i + 1}).annorect({r + 1}) ({name})"
            try:
                # every listed point is labelled; is_visible is often empty or a string in the release
                ids = [int(p.id) for p in _mat_list(points.point)]
                xy = [(float(p.x) - 1.0, float(p.y) - 1.0) for p in _mat_list(points.point)]
                center = [float(rect.objpos.x) - 1.0, float(rect.objpos.y) - 1.0]
                scale = float(rect.scale)
            except (AttributeError, TypeError, ValueError) as e:
                skipped.append(_skip(source, f"incomplete person annotation ({e})"))
                continue
            if any(not 0 <= j < 16 for j in ids):
                skipped.append(_skip(source, f"wrong joint count: joint ids {ids}, expected 0..15"))
                continue
            kp = np.zeros((16, 3))
            for j, (x, y) in zip(ids, xy):
                kp[j] = [x, y, 1.0]
            try:
                head = [float(rect.x1) - 1.0, float(rect.y1) - 1.0, float(rect.x2 - rect.x1), float(rect.y2 - rect.y1)]
            except (AttributeError, TypeError, ValueError):
                head = None
            size = scale * 200.0  # MPII scale: person height / 200 px
            records.append(Record(
                key=f"mpii_{idx:06d}",
                idx=idx,
                image=os.path.join(images, name),
                keypoints=kp,
                box=[center[0] - size / 2, center[1] - size / 2, size, size],
                center=center,
                scale=scale,
                head_box=head,
                source_id=f"{name}#{r + 1}",
                extra={"img_train": None if is_train[i] is None else int(is_train[i])},
            ))
    return records, skipped, {}


# -----------------------------------------------------------------------------
# COCO


def keypoints_field(annotations, anns: list, cat_id, num_joints: int, asked: str | None = None) -> str:
    """The annotation field that holds the category's joints: `asked` (--keypoints-field), else
    `keypoints` when its length is 3 x the category's joint count, else the one list field of that
    length (sets such as COCO-WholeBody keep 17 body joints in `keypoints` and the whole set in
    another field, e.g. `keypoints_21`)."""
    person = next((a for a in anns if isinstance(a, dict) and a.get("category_id") == cat_id), None)
    if person is None or asked:
        return asked or "keypoints"
    sizes = {k: len(v) for k, v in person.items() if isinstance(v, list) and k.startswith("keypoints")}
    if sizes.get("keypoints") == 3 * num_joints:
        return "keypoints"
    fits = sorted(k for k, n in sizes.items() if n == 3 * num_joints)
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise AnnotationError(f"{annotations}: fields {fits} each hold {num_joints} joints x 3: choose one with "
                              f"--keypoints-field")
    return "keypoints"  # none fits: each annotation is then skipped as "wrong joint count"


def read_coco(images, annotations, min_keypoints=1, field=None):
    """person_keypoints_*.json: one sample per non-crowd person with >= min_keypoints labelled
    keypoints. v is kept as 0/1/2; bbox kept. Sample key/idx = the annotation id. The joints come
    from `field`, or the field `keypoints_field` finds; the report says which."""
    data = _load_json(annotations)
    if not isinstance(data, dict):
        raise AnnotationError(f"{annotations}: expected a JSON object with 'images' and 'annotations'")
    for name in ("images", "annotations", "categories"):
        if not isinstance(data.get(name), list):
            raise AnnotationError(f"{annotations}: field '{name}' missing or not a list")
    cats = [c for c in data["categories"] if isinstance(c, dict) and c.get("keypoints")]
    if not cats:
        raise AnnotationError(f"{annotations}: no category with 'keypoints' in field 'categories'")
    cat = cats[0]
    num_joints = len(cat["keypoints"])
    field = keypoints_field(annotations, data["annotations"], cat["id"], num_joints, field)
    image_info = {}
    for k, im in enumerate(data["images"]):
        image_info[_field(annotations, f"images[{k}]", im, "id")] = im
    records, skipped = [], []
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        ann_id = _field(annotations, where, ann, "id")
        if ann.get("category_id") != cat["id"]:
            continue  # not a person annotation
        image_id = _field(annotations, where, ann, "image_id")
        source = f"{annotations}#ann {ann_id} (image {image_id})"
        if ann.get("iscrowd", 0):
            skipped.append(_skip(source, "crowd annotation"))
            continue
        if image_id not in image_info:
            skipped.append(_skip(source, f"image id {image_id} not in field 'images'"))
            continue
        try:
            kps = np.asarray(_field(annotations, where, ann, field), dtype=np.float64)
            bbox = [float(b) for b in _field(annotations, where, ann, "bbox")]
            ann_id = int(ann_id)
        except (TypeError, ValueError):
            raise AnnotationError(f"{annotations}: {where} has a non-numeric '{field}', 'bbox' or 'id'") from None
        if kps.size != 3 * num_joints:
            skipped.append(_skip(source, f"wrong joint count: {kps.size} values in '{field}', expected {3 * num_joints}"))
            continue
        kps = kps.reshape(num_joints, 3)
        labelled = int((kps[:, 2] > 0).sum())
        if labelled < max(min_keypoints, 1):
            skipped.append(_skip(source, f"too few keypoints: {labelled} labelled < {max(min_keypoints, 1)}"))
            continue
        info = image_info[image_id]
        file_name = _field(annotations, f"image id {image_id}", info, "file_name")
        records.append(Record(
            key=f"coco_{ann_id:012d}",
            idx=int(ann_id),
            image=resolve_image(images, str(file_name)),
            keypoints=kps,
            box=bbox,
            source_id=ann_id,
            extra={"image_id": image_id, "file_name": file_name, "area": ann.get("area"),
                   "num_keypoints": ann.get("num_keypoints")},
        ))
    # the public subsets list more images than they ship: say which, once, instead of failing on them
    missing = [str(im.get("file_name")) for im in data["images"]
               if not os.path.isfile(resolve_image(images, str(im.get("file_name"))))]
    return records, skipped, {"missing_images": missing, "keypoints_field": field}


def resolve_image(images, file_name):
    """A `file_name` as COCO-format files write it (plain, in sub-folders, with a split prefix such as
    train2017/...) against the --images folder: the first of images/file_name, then with leading
    folders dropped one at a time, that exists; else images/file_name (reported missing later)."""
    parts = file_name.replace("\\", "/").lstrip("/").split("/")
    for k in range(len(parts)):
        candidate = os.path.join(images, *parts[k:])
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(images, *parts)
