"""The throughput tool runs a scorer in process and through a local gRPC service."""
from services.reward.bench import main


def test_bench_reports_images_per_second_and_the_grpc_round_trip(capsys):
    main(["--scorers", "brightness", "--batch", "2", "--size", "64", "--repeats", "1", "--grpc"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("brightness") and "images/s" in line and "gRPC" in line and "[numpy-mean]" in line
