import dataclasses

import pytest
import reference_models as rm

import shapes
from shapes import ConvLayer


@pytest.mark.parametrize("net", shapes.NETS)
def test_catalog_matches_from_model_on_reference_definition(net):
    extracted = shapes.from_model(rm.MODELS[net](), (3, 224, 224), net=net)
    assert shapes.load(net) == extracted


@pytest.mark.parametrize("net,convs,gmac", [("resnet50", 53, 4.09), ("vgg19", 16, 19.5),
                                             ("resnet18", 20, 1.81), ("squeezenet1_1", 26, 0.35)])
def test_catalog_conv_count_and_total_macs(net, convs, gmac):
    layers = shapes.load(net)
    assert len(layers) == convs
    assert shapes.total_macs(layers) / 1e9 == pytest.approx(gmac, rel=0.01)


def test_resnet50_has_four_downsample_convs_named_like_torchvision():
    names = [lay.name for lay in shapes.load("resnet50")]
    assert [n for n in names if "downsample" in n] == [
        f"layer{i}.0.downsample.0" for i in range(1, 5)]
    assert names[0] == "conv1" and names[-1] == "layer4.2.conv3"


def test_paper_layer_mapping_rule_points_at_the_documented_layers():
    plain = [lay for lay in shapes.load("resnet50") if "downsample" not in lay.name]
    assert plain[3].name == "layer1.0.conv3" and plain[3].shape_key[:4] == (64, 256, 1, 1)
    assert plain[11].name == "layer2.0.conv2" and (plain[11].stride, plain[11].oh) == (2, 28)
    assert plain[41].name == "layer4.0.conv2" and (plain[41].h, plain[41].oh) == (14, 7)


def test_vgg19_names_are_feature_indices():
    assert [lay.name for lay in shapes.load("vgg19")][:5] == [
        "features.0", "features.2", "features.5", "features.7", "features.10"]


def test_unique_merges_identical_shapes_and_keeps_total_work():
    layers = shapes.load("resnet50")
    uniq = shapes.unique(layers)
    assert len(uniq) < len(layers)
    assert sum(u.count for u in uniq) == len(layers)
    assert shapes.total_macs(uniq) == shapes.total_macs(layers)
    assert len({u.shape_key for u in uniq}) == len(uniq)


def test_output_size_and_flops_follow_the_convolution_formula():
    lay = ConvLayer(net="t", name="c", index=0, cin=8, cout=16, kh=3, kw=3, stride=2, padding=1,
                    h=13, w=17)
    assert (lay.oh, lay.ow) == (7, 9)
    assert lay.flops(2) == 2 * 2 * 16 * 7 * 9 * 8 * 9


def test_convlayer_rejects_bad_fields():
    base = dict(net="t", name="c", index=0, cin=8, cout=16, kh=3, kw=3, stride=1, padding=1,
                h=8, w=8)
    with pytest.raises(ValueError, match="cin"):
        ConvLayer(**{**base, "cin": 0})
    with pytest.raises(TypeError, match="stride"):
        ConvLayer(**{**base, "stride": 1.5})
    with pytest.raises(ValueError, match="empty"):
        ConvLayer(**{**base, "kh": 11, "padding": 0})


def test_load_rejects_unknown_net_naming_valid_ones():
    with pytest.raises(ValueError, match="resnet50"):
        shapes.load("alexnet")


def test_load_csv_round_trip_and_defaults(tmp_path):
    layers = shapes.load("vgg19")[:3]
    path = tmp_path / "mine.csv"
    shapes.save_csv(layers, path)
    assert shapes.load_csv(path) == layers
    path.write_text("name,cin,cout,kh,kw,stride,padding,h,w\nblk,32,64,3,3,1,1,20,20\n")
    (lay,) = shapes.load_csv(path)
    assert (lay.net, lay.index, lay.count, lay.oh) == ("mine", 0, 1, 20)


def test_load_csv_errors_name_the_line_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("name,cin,cout,kh,kw,stride,padding,h,w\nblk,32,x,3,3,1,1,20,20\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: column 'cout'"):
        shapes.load_csv(path)
    path.write_text("name,cin,cout\nblk,32,64\n")
    with pytest.raises(ValueError, match="missing column"):
        shapes.load_csv(path)


def test_from_model_accepts_batched_size_and_records_groups():
    from torch import nn
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, groups=2))
    a, b = shapes.from_model(m, (2, 4, 9, 11))
    assert (a.h, a.w, a.oh, a.ow) == (9, 11, 9, 11)
    assert (b.groups, b.stride, b.h, b.oh, b.ow) == (2, 2, 9, 4, 5)
    assert dataclasses.replace(b, name="x").name == "x"
