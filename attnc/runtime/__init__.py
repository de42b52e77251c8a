"""The runtime library that generated modules import (versioned; see RUNTIME_VERSION)."""
