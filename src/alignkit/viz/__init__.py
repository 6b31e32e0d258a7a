"""Visual quality control: registration QC figures and optical-flow colour coding.

Matplotlib is used only through ``matplotlib.figure.Figure`` and the Agg canvas -- importing this
package never touches pyplot or the global backend.
"""

from alignkit.viz.flowcolor import colorwheel_legend, flow_to_color, make_colorwheel
from alignkit.viz.qc import save_qc_figure

__all__ = ["colorwheel_legend", "flow_to_color", "make_colorwheel", "save_qc_figure"]
