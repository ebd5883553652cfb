"""FFCV pieces of the FFCV engine: imported only through ``ffcv.import_ffcv`` (``import ffcv``
changes torch's thread count, which that function puts back).

``PlanCropDecoder`` is an FFCV decoder (a ``SimpleRGBImageDecoder``, so that FFCV takes it as
the image field's decoder; its code and memory are its own, as those of FFCV's
``ResizedCropRGBImageDecoder``) that crops the box the Loader's plan chose for each sample
instead of drawing one, and flips as the plan says. Numba freezes the globals and closure
variables of compiled code when it compiles, so a table the engine re-filled each epoch would
never be seen: the boxes travel as *memory* instead, the one argument FFCV hands the compiled
code fresh for every batch. The decoder declares a third buffer, ``PARAMS`` int32 per sample,
which the engine's epoch thread fills with the batch's boxes just before the batch runs.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

# per sample: x0, y0, x1, y1 (whole source pixels, end exclusive), flip, decode status (out)
X0, Y0, X1, Y1, FLIP, STATUS = range(6)
PARAMS = 6


class PlanCropDecoder(SimpleRGBImageDecoder):
    """Decoder for FFCV's ``RGBImageField``: decode each image whole (libjpeg-turbo, or the raw
    pixels), crop rows ``y0:y1`` and columns ``x0:x1`` from the batch's params memory, resize the
    crop to ``output_size``² with OpenCV's ``INTER_AREA`` (FFCV's ``resize_crop``, as its
    ``ResizedCropRGBImageDecoder``) and mirror it where ``flip`` is set.

    Output: uint8 N×S×S×3. Memory: the output, a decode scratch of the largest image per sample
    (FFCV's layout) and the params, int32 N×6 (see ``X0``…``STATUS``): the decoder writes
    libjpeg-turbo's status (0: decoded) into the last column. Boxes must hold at least one pixel
    inside the image: OpenCV aborts the process (SIGABRT, no exception) on an empty or outside
    range, so the engine checks every box before it reaches here.
    """

    def __init__(self, output_size: int):
        super().__init__()
        self.output_size = output_size

    def declare_state_and_memory(self, previous_state: State):
        largest = int(self.metadata["height"].max()) * int(self.metadata["width"].max())
        shape = (self.output_size, self.output_size, 3)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                (AllocationQuery(shape, u8), AllocationQuery((3 * largest,), u8),
                 AllocationQuery((PARAMS,), np.dtype("<i4"))))

    def generate_code(self):
        read = self.memory_read
        loop = Compiler.get_iterator()
        decode_jpeg = Compiler.compile(imdecode)
        crop_resize = Compiler.compile(resize_crop)
        jpg = IMAGE_MODES["jpg"]

        def decode(batch_indices, memory, metadata, storage_state):
            out, scratch, params = memory
            side = out.shape[2]
            for k in loop(len(batch_indices)):
                field = metadata[batch_indices[k]]
                data = read(field["data_ptr"], storage_state)
                h = np.uint32(field["height"])
                w = np.uint32(field["width"])
                if field["mode"] == jpg:
                    params[k, STATUS] = decode_jpeg(data, scratch[k], h, w, h, w, 0, 0, 1, 1,
                                                    False, False)
                    pixels = scratch[k][:3 * h * w].reshape(h, w, 3)
                else:
                    params[k, STATUS] = 0
                    pixels = data.reshape(h, w, 3)
                crop_resize(pixels, params[k, Y0], params[k, Y1], params[k, X0], params[k, X1],
                            out[k])
                if params[k, FLIP]:
                    img = out[k]
                    for r in range(side):
                        for c in range(side // 2):
                            for ch in range(3):
                                t = img[r, c, ch]
                                img[r, c, ch] = img[r, side - 1 - c, ch]
                                img[r, side - 1 - c, ch] = t
            return out[:len(batch_indices)]

        decode.is_parallel = True
        return decode
