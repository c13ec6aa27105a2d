//! Shapes against a signature's tensor specs: the one rule that daemon validation and
//! clients generating inputs share.

use crate::message::TensorSpec;

impl TensorSpec {
    /// Whether `shape` has the spec's rank and its fixed dimensions (a negative dimension in
    /// the spec is dynamic: any size fits).
    pub fn fits(&self, shape: &[u64]) -> bool {
        shape.len() == self.dims.len()
            && shape
                .iter()
                .zip(&self.dims)
                .all(|(&got, &want)| want < 0 || u64::try_from(want) == Ok(got))
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, TensorSpec};

    #[test]
    fn a_shape_fits_the_rank_and_the_fixed_dimensions() {
        let spec = TensorSpec {
            name: "x".into(),
            dtype: DType::Float32,
            dims: vec![-1, 3, -1],
            dim_names: vec![String::new(); 3],
            max_dims: Vec::new(),
            warmup_dims: Vec::new(),
            warmup_value: None,
        };
        assert!(spec.fits(&[1, 3, 7]));
        assert!(spec.fits(&[64, 3, 0]));
        assert!(!spec.fits(&[1, 4, 7]), "fixed dimension");
        assert!(!spec.fits(&[1, 3]), "rank");
        assert!(!spec.fits(&[1, 3, 7, 1]), "rank");
    }
}
