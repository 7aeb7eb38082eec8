from setuptools import find_packages, setup

setup(
    name="dinov2_hier",
    version="0.1.0",
    description="DINOv2 pretraining with hierarchical supervision for blood-cell microscopy",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["dinov2_hier", "dinov2_hier.*", "eval", "eval.*", "bench", "bench.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "omegaconf>=2.3",
        "fvcore",
        "submitit",
        "scikit-learn",
        "safetensors",
        "Pillow",
        "PyYAML",
    ],
    extras_require={
        "xformers": ["xformers"],
        "umap": ["umap-learn"],
        "timm": ["timm"],
        "parquet": ["pyarrow"],  # python -m eval.extract --output FILE.parquet
        "tensorboard": ["tensorboard"],  # train.tensorboard=true
        "test": ["pytest", "pytest-xdist", "timm"],
    },
)
