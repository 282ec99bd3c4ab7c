"""The datasets of the standard benchmark suites: TFDS name, split, features, and the class
names and prompt templates CLIP_benchmark publishes for each (mmjax/data/label_text/).

Names are CLIP_benchmark's (`benchmark/datasets.txt`), so a result file here and one of
CLIP_benchmark describe the same dataset; `vtab/*` are the VTAB splits CLIP_benchmark reads
through tensorflow-datasets. Where TFDS cannot build one of CLIP_benchmark's datasets, it is
not listed (docs/guide.md, "Benchmark suites", says which and why).
"""
import dataclasses
import glob
import os

from mmjax.data import classnames

CLASSIFICATION, RETRIEVAL, CAPTIONING = "zeroshot_classification", "zeroshot_retrieval", \
    "captioning"


@dataclasses.dataclass(frozen=True)
class BenchmarkDataset:
  """One suite member.

  name: CLIP_benchmark's dataset name ("imagenet1k", "vtab/cifar10", "mscoco_captions").
  task: CLASSIFICATION | RETRIEVAL | CAPTIONING (CLIP_benchmark's task names).
  tfds: TFDS name (with config); split: TFDS split (VTAB's test slices where it has one).
  num_classes: candidates (after class_subset); 0 for image-text datasets.
  class_names / templates / class_subset: `mmjax.data.classnames` specs (evals.* keys).
  obtain: how to get the files when they are not in data_dir ("" = `tfds build` downloads).
  """
  name: str
  task: str
  tfds: str
  split: str
  num_classes: int = 0
  label_key: str = "label"
  text_key: str = ""
  class_names: str = ""
  templates: str = ""
  class_subset: str = ""
  obtain: str = ""

  @property
  def file_stem(self) -> str:
    """Its result file's name: the dataset name, plus the task where the dataset also
    serves another (COCO: retrieval, and captioning as `mscoco_captions_captioning`)."""
    stem = self.name.replace("/", "_")
    return f"{stem}_captioning" if self.task == CAPTIONING else stem


def _imagenet_manual(files: str) -> str:
  return (f"download {files} from https://image-net.org (login) into "
          "<data_dir>/downloads/manual, then `tfds build imagenet2012 --data_dir <data_dir> "
          "--file_format=array_record`")


def _cls(name: str, tfds: str, split: str, num_classes: int, *, names: str = "dataset",
         templates: str = "", **kw) -> BenchmarkDataset:
  """A classification member; templates default to CLIP_benchmark's lookup (its own name,
  its name without `vtab/`, else imagenet1k's)."""
  if not templates:
    table = classnames.clip_benchmark_table("templates")
    short = name.split("/")[-1]
    templates = next(f"clip_benchmark/{k}" for k in (name, short, "imagenet1k") if k in table)
  return BenchmarkDataset(name, CLASSIFICATION, tfds, split, num_classes, class_names=names,
                          templates=templates, **kw)


IMAGENET = (
    _cls("imagenet1k", "imagenet2012", "validation", 1000, names="imagenet1k",
         obtain=_imagenet_manual("ILSVRC2012_img_val.tar and ILSVRC2012_img_train.tar")),
    _cls("imagenetv2", "imagenet_v2/matched-frequency", "test", 1000, names="imagenet1k"),
    _cls("imagenet_sketch", "imagenet_sketch", "test", 1000, names="imagenet1k"),
    _cls("imagenet-a", "imagenet_a", "test", 200, names="imagenet1k", class_subset="imagenet_a"),
    _cls("imagenet-r", "imagenet_r", "test", 200, names="imagenet1k", class_subset="imagenet_r"),
)

# VTAB's test slices of the TFDS datasets that have only a train split (task_adaptation:
# 60% train, 20% validation, 20% test, in TFDS order).
VTAB_AND_OTHERS = (
    _cls("vtab/cifar10", "cifar10", "test", 10),
    _cls("vtab/cifar100", "cifar100", "test", 100),
    _cls("mnist", "mnist", "test", 10, names="clip_benchmark/mnist"),
    _cls("stl10", "stl10", "test", 10),
    _cls("cars", "cars196", "test", 196),
    _cls("food101", "food101", "validation", 101, names="dataset_words"),
    _cls("sun397", "sun397/tfds", "test", 397, names="dataset_words"),
    _cls("vtab/caltech101", "caltech101", "test", 102, names="clip_benchmark/caltech101_vtab"),
    _cls("vtab/dtd", "dtd", "test", 47),
    _cls("vtab/eurosat", "eurosat/rgb", "train[21600:]", 10, names="clip_benchmark/eurosat"),
    _cls("vtab/flowers", "oxford_flowers102", "test", 102),
    _cls("vtab/pets", "oxford_iiit_pet", "test", 37, names="clip_benchmark/pets"),
    _cls("vtab/pcam", "patch_camelyon", "test", 2, names="clip_benchmark/pcam"),
    _cls("vtab/resisc45", "resisc45", "train[25200:]", 45,
         obtain="download NWPU-RESISC45.rar (see `tfds build resisc45`'s manual-download "
                "instructions) and extract it into <data_dir>/downloads/manual, then "
                "`tfds build resisc45 --data_dir <data_dir> --file_format=array_record`"),
    _cls("vtab/svhn", "svhn_cropped", "test", 10, names="clip_benchmark/svhn"),
    _cls("vtab/dmlab", "dmlab", "test", 6, names="clip_benchmark/dmlab"),
    _cls("vtab/smallnorb_label_azimuth", "smallnorb", "test", 18, label_key="label_azimuth"),
    _cls("vtab/smallnorb_label_elevation", "smallnorb", "test", 9,
         label_key="label_elevation"),
    _cls("vtab/diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300", "test", 5,
         names="clip_benchmark/diabetic_retinopathy",
         obtain="`kaggle competitions download -c diabetic-retinopathy-detection` into "
                "<data_dir>/downloads/manual and extract it, then `tfds build "
                "diabetic_retinopathy_detection/btgraham-300 --data_dir <data_dir> "
                "--file_format=array_record`"),
)

_COCO_BUILD = ("`tfds build coco_captions --data_dir <data_dir> --file_format=array_record` "
               "(its builder needs TensorFlow to build, not to read: build it where TF is "
               "installed and copy <data_dir>/coco_captions)")
COCO_RETRIEVAL = BenchmarkDataset(
    "mscoco_captions", RETRIEVAL, "coco_captions", "test", text_key="captions/text",
    obtain=_COCO_BUILD)
FLICKR30K_RETRIEVAL = BenchmarkDataset(
    "flickr30k", RETRIEVAL, "flickr30k_karpathy", "train", text_key="captions",
    obtain="not in TFDS: write the 1,000 images of the Karpathy test split "
           "(dataset_flickr30k.json) with their 5 captions as a captions .csv and run "
           "`python -m mmjax.data.build --captions_file FILE.csv --name flickr30k_karpathy "
           "--data_dir <data_dir>` (docs/guide.md, 'Benchmark suites')")
COCO_CAPTIONING = BenchmarkDataset(
    "mscoco_captions", CAPTIONING, "coco_captions", "test", text_key="captions/text",
    obtain=_COCO_BUILD)

SUITES = {
    "imagenet": IMAGENET,
    "clip_benchmark": IMAGENET + VTAB_AND_OTHERS + (COCO_RETRIEVAL, FLICKR30K_RETRIEVAL),
    "retrieval": (COCO_RETRIEVAL, FLICKR30K_RETRIEVAL),
    "captioning": (COCO_CAPTIONING,),
}


def every_dataset() -> list[BenchmarkDataset]:
  """Every member of every suite, once (by name and task), in suite order."""
  seen, out = set(), []
  for members in SUITES.values():
    for ds in members:
      if (ds.name, ds.task) not in seen:
        seen.add((ds.name, ds.task))
        out.append(ds)
  return out


def is_present(ds: BenchmarkDataset, data_dir: str) -> bool:
  """Whether `data_dir` holds a prepared version of the dataset (its dataset_info.json)."""
  root = os.path.join(os.path.expanduser(data_dir), *ds.tfds.split(":")[0].split("/"))
  return bool(glob.glob(os.path.join(glob.escape(root), "*", "dataset_info.json")))


def how_to_obtain(ds: BenchmarkDataset, data_dir: str) -> str:
  how = ds.obtain or (f"`tfds build {ds.tfds} --data_dir <data_dir> "
                      "--file_format=array_record` downloads and prepares it")
  return how.replace("<data_dir>", data_dir)
