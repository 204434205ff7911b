"""The reference networks now live in the product (``shapes.models``); kept importable here for
the tests that compare the catalogs with ``shapes.from_model``."""

from shapes.models import MODELS, build, resnet18, resnet50, squeezenet1_1, vgg19  # noqa: F401
