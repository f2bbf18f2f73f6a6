"""Makes DejaVuSans-charts.ttf, the font the report's charts are drawn with: DejaVu Sans cut to
printable ASCII plus the few symbols the charts print (± − × · –), so the binary carries ~20 kB
instead of ~760 kB. DejaVu Sans is free (Bitstream Vera licence + public-domain changes; see
LICENSE.txt beside this file). Run once with fontTools (pip install fonttools):

    python make_subset.py /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
"""

import sys
from pathlib import Path

from fontTools import subset

src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
out = Path(__file__).with_name("DejaVuSans-charts.ttf")
chars = [chr(c) for c in range(0x20, 0x7F)] + ["±", "−", "×", "·", "–"]
options = subset.Options()
options.layout_features = ["kern"]
options.hinting = False
options.name_IDs = ["*"]
font = subset.load_font(src, options)
sub = subset.Subsetter(options)
sub.populate(text="".join(chars))
sub.subset(font)
subset.save_font(font, str(out), options)
print(out, out.stat().st_size, "bytes")
