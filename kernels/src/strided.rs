//! How a column-major BLAS (cuBLAS) reads the row-major, strided matrices of Burn's tensors
//! without copying them: which operands it reads as they lie, with which leading dimension,
//! and how batch dimensions become strided batches. Plain index arithmetic, compiled whatever
//! the features, so that its tests run in every build.

/// `(m, k, n)` of `a · b` for shapes `[..., m, k]` and `[..., k, n]` with the same leading (batch)
/// sizes; `None` when they do not multiply so.
pub fn product_sizes(a: &[usize], b: &[usize]) -> Option<[usize; 3]> {
    let rank = a.len();
    let fits = rank >= 2 && b.len() == rank && a[..rank - 2] == b[..rank - 2];
    (fits && a[rank - 1] == b[rank - 2]).then(|| [a[rank - 2], a[rank - 1], b[rank - 1]])
}

/// How cuBLAS (column-major) reads one matrix operand of a row-major product: `transposed`
/// when its memory holds the operand column by column (a transposed view), `ld` the distance
/// between consecutive rows (or columns) in elements.
pub struct Operand {
    pub transposed: bool,
    pub ld: usize,
}

/// The layout of the last two dimensions (`rows × cols`, `strides`), if cuBLAS can read it
/// without a copy: one of the two strides must be 1.
pub fn operand(rows: usize, cols: usize, strides: [usize; 2]) -> Option<Operand> {
    let [row_stride, col_stride] = strides;
    if (col_stride == 1 || cols == 1) && (rows == 1 || row_stride >= cols.max(1)) {
        let ld = if rows == 1 { cols.max(1) } else { row_stride };
        return Some(Operand {
            transposed: false,
            ld,
        });
    }
    if (row_stride == 1 || rows == 1) && (cols == 1 || col_stride >= rows.max(1)) {
        let ld = if cols == 1 { rows.max(1) } else { col_stride };
        return Some(Operand {
            transposed: true,
            ld,
        });
    }
    None
}

/// The batch dimensions as (outer offsets of each tensor, count and stride of one strided batch):
/// cuBLAS runs one strided batch per outer index. Size-1 dimensions are dropped, and the
/// innermost dimensions merge into the strided batch as far as all three tensors lay them out
/// at one stride.
#[allow(clippy::type_complexity)]
pub fn batches(sizes: &[usize], strides: [&[usize]; 3]) -> (Vec<[usize; 3]>, usize, [usize; 3]) {
    let dims: Vec<usize> = (0..sizes.len()).filter(|&d| sizes[d] > 1).collect();
    let Some(&last) = dims.last() else {
        return (vec![[0; 3]], 1, [0; 3]);
    };
    // dims[first..] merge: each one's stride is the next one's stride times its size.
    let mut first = dims.len() - 1;
    while first > 0 {
        let (outer, inner) = (dims[first - 1], dims[first]);
        if !strides.iter().all(|s| s[outer] == s[inner] * sizes[inner]) {
            break;
        }
        first -= 1;
    }
    let count: usize = dims[first..].iter().map(|&d| sizes[d]).product();
    let stride = strides.map(|s| s[last]);
    let mut offsets = vec![[0usize; 3]];
    for &d in &dims[..first] {
        offsets = offsets
            .into_iter()
            .flat_map(|base| {
                (0..sizes[d]).map(move |i| {
                    let mut next = base;
                    for (t, s) in strides.iter().enumerate() {
                        next[t] += i * s[d];
                    }
                    next
                })
            })
            .collect();
    }
    (offsets, count, stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_need_equal_batches_and_matching_inner_sizes() {
        assert_eq!(product_sizes(&[2, 5, 3], &[2, 3, 7]), Some([5, 3, 7]));
        assert_eq!(product_sizes(&[2, 5, 3], &[4, 3, 7]), None);
        assert_eq!(product_sizes(&[5, 3], &[4, 7]), None);
        assert_eq!(product_sizes(&[3], &[3]), None);
    }

    #[test]
    fn operands_read_through_either_stride() {
        let row_major = operand(3, 5, [5, 1]).unwrap();
        assert!(!row_major.transposed && row_major.ld == 5);
        let transposed_view = operand(3, 5, [1, 3]).unwrap();
        assert!(transposed_view.transposed && transposed_view.ld == 3);
        // A slice of columns of a wider matrix keeps the wider row stride.
        assert_eq!(operand(3, 5, [8, 1]).unwrap().ld, 8);
        // Neither stride is 1: cuBLAS cannot read it.
        assert!(operand(3, 5, [10, 2]).is_none());
    }

    #[test]
    fn batch_dimensions_merge_where_their_strides_nest() {
        // [2, 3] batches of 4×4 matrices, contiguous: one strided batch of 6.
        let s = [48usize, 16];
        assert_eq!(batches(&[2, 3], [&s, &s, &s]), (vec![[0; 3]], 6, [16; 3]));
        // Heads swapped with positions ([b, s, h, d] viewed as [b, h, s, d]): the head stride
        // (d) does not nest in the batch stride, so one strided batch per batch index.
        let view = [3 * 4 * 8usize, 8];
        let out = [3 * 4 * 4usize, 16];
        let (outer, count, stride) = batches(&[2, 3], [&view, &view, &out]);
        assert_eq!(outer, vec![[0; 3], [96, 96, 48]]);
        assert_eq!((count, stride), (3, [8, 8, 16]));
        // Size-1 batch dimensions do not count.
        assert_eq!(batches(&[1, 1], [&s, &s, &s]), (vec![[0; 3]], 1, [0; 3]));
    }
}
