// COCO compressed RLE, decoded in the browser (pycocotools' rleFrString, in JavaScript).
//
// A mask is a list of run lengths over its pixels in column-major order (down the first column,
// then the next), starting with a run of zeros. The string writes each run as a little-endian
// varint of 5-bit groups in the characters "0".."o" (48 + value): bit 0x20 says another character
// follows, bit 0x10 of the last one makes the number negative. From the third run on, what is
// stored is the difference to the run two places before.

/** The run lengths of a compressed counts string. */
export function decodeCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let value = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= text.length) throw new Error("truncated RLE counts string");
      const c = text.charCodeAt(p) - 48;
      if (c < 0 || c > 63) throw new Error(`invalid character in RLE counts at ${p}`);
      // Arithmetic, not shifts: JavaScript shifts wrap at 32 bits, and seven groups are 35 bits.
      value += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) value -= 2 ** (5 * k); // sign-extend the last group
    }
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

/**
 * The row-major indices (y * width + x) of a mask's pixels, from {size: [height, width], counts}
 * (a compressed string, or the run lengths themselves). Drawing and hit-testing only visit these,
 * so a small mask on a large photo costs its own area, not the photo's.
 */
export function maskIndices({ size: [height, width], counts }) {
  const runs = typeof counts === "string" ? decodeCounts(counts) : counts;
  let total = 0;
  let length = 0;
  runs.forEach((run, i) => {
    if (run < 0) throw new Error("negative run in RLE counts");
    length += run;
    if (i % 2 === 1) total += run;
  });
  if (length !== height * width) throw new Error(`RLE covers ${length} pixels, not ${height} x ${width}`);
  const indices = new Uint32Array(total);
  let n = 0;
  let start = 0;
  runs.forEach((run, i) => {
    if (i % 2 === 1) {
      let x = Math.floor(start / height);
      let y = start - x * height;
      for (let j = 0; j < run; j += 1) {
        indices[n++] = y * width + x;
        y += 1;
        if (y === height) { y = 0; x += 1; }
      }
    }
    start += run;
  });
  return indices;
}
