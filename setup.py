from setuptools import find_packages, setup

setup(
    name="fluence_fairseq",
    version="0.2.0",
    description="Adaptive, sparse and efficient attention for fairseq (--user-dir fluence_fairseq)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["fluence_fairseq", "fluence_fairseq.*"]),
    install_requires=[
        # pin torch yourself before installing (see README): an unpinned torch pulls a CUDA build
        "torch>=2.4",
        # fairseq 0.12.2 does not import on Python 3.11; ve-fairseq is a cp311/cp312 manylinux x86_64 wheel
        "ve-fairseq==0.12.3",
        "entmax>=1.1",
        "numpy",
        "sacrebleu>=2.0",
        "sentencepiece",
        "matplotlib",
        "scikit-learn",  # k-means of the importance sampler (fairseq's sentence_prediction metrics use it too)
    ],
    extras_require={"test": ["pytest", "pytest-xdist"]},
    entry_points={
        "console_scripts": [
            "fluence-help=fluence_fairseq.cli.help:main",
            "fluence-plot=fluence_fairseq.cli.plot:main",
            "fluence-attn-score=fluence_fairseq.cli.attn_score:main",
            "fluence-prune-layers=fluence_fairseq.cli.prune_layers:main",
            "fluence-prune-weights=fluence_fairseq.cli.prune_weights:main",
            "fluence-sample=fluence_fairseq.cli.sample:main",
            "fluence-stream-bpc=fluence_fairseq.cli.stream_bpc:main",
        ]
    },
)
