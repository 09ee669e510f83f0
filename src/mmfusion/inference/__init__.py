"""Everything that loads a model for prediction: evaluate, package, monitoring and serving import it from here.

    from mmfusion.inference.predictor import Predictor
    p = Predictor.from_dir("models/best")

    checkpoint.py     the self-describing model directory: save/load, config, calibration, version
    head_runtime.py   the fusion head under torch or ONNX Runtime
    predictor.py      encoders + head + label map + calibration, from one model directory

Nothing is re-exported here: training imports `checkpoint` alone, and importing this package must not
load the predictor's encoders (dvc.yaml would then rerun train whenever serving code changes).
"""
