import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torchvision_stub  # noqa: E402

torchvision_stub.install()
