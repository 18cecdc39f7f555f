"""ZipQDoRA Studio on Hugging Face Spaces (this file is the Space's `app_file`) and locally:

    python app.py [--base mini] [--host 0.0.0.0] [--port 7860] [--max-job-seconds 600] …  (--help lists them)

The page lives in the `studio` package, the work in `zipq_core`.
"""

import sys

from studio.launch import main

if __name__ == "__main__":
    sys.exit(main())
