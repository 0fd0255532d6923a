"""Students leave kdcache: the deployable detector graph and its formats (ONNX, TorchScript,
torchvision, mmdetection), plus the speed/accuracy measurement the report shows."""
