# ilias-ray runtime image: the Ray image of the pinned Ray and Python, the pinned dependencies, this project.
# cluster.yaml (docker.image) and jobs/rayjob.yaml (both pods) run it; the tag is pyproject.toml's version.
#
#   docker build -t <account>.dkr.ecr.us-west-2.amazonaws.com/ilias-ray:0.1.0 .          # AWS (ECR)
#   docker build -t <region>-docker.pkg.dev/<project>/ilias/ilias-ray:0.1.0 .             # GKE (Artifact Registry)
#
# No credentials go into the image: nodes and pods get them from instance profiles / workload identity.
FROM rayproject/ray:2.60.0-py311-gpu

# Dependencies first, exactly as pinned (this layer is rebuilt only when requirements.txt changes). The runtime's
# only: not scikit-image, which only `ilias-ray demo`'s sample photos need (pyproject's `demo` extra).
COPY --chown=ray:users requirements.txt /home/ray/ilias-ray/requirements.txt
RUN pip install --no-cache-dir -r /home/ray/ilias-ray/requirements.txt

# The project at a fixed path (jobs/rayjob.yaml runs /home/ray/ilias-ray/jobs/extract_model.py), installed
# without touching the pinned dependencies; `ilias-ray` is on PATH.
COPY --chown=ray:users . /home/ray/ilias-ray
RUN pip install --no-cache-dir --no-deps /home/ray/ilias-ray \
    && python -c "import ilias_ray.cli.main, ray, torch; print('ilias-ray image: ray', ray.__version__, 'torch', torch.__version__)"
