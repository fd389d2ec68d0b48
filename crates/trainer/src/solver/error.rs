//! The solver's error type.

/// Errors raised while configuring, stepping or restoring the solver.
#[derive(Debug, thiserror::Error)]
pub enum SolverError {
    /// A `[solver]` value that cannot work.
    #[error("`solver.{key}`: {message}")]
    Config { key: String, message: String },
    /// A loss term became NaN or infinite: the step's update was skipped and the run must stop. `iteration`
    /// counts from 1, as the log lines do (`iter 3/100` is the iteration that completes the third step).
    #[error(
        "iteration {iteration}: loss term `{term}` is {value}; stopping (its update was skipped, the last checkpoint \
         is untouched)"
    )]
    NonFiniteLoss { iteration: u64, term: String, value: f64 },
    /// Gradients became NaN or infinite without a loss scaler that could skip the step: the update was skipped
    /// and the run must stop (`iteration` from 1).
    #[error(
        "iteration {iteration}: the gradient norm is {norm}; stopping (its update was skipped, the last checkpoint \
         is untouched)"
    )]
    NonFiniteGradients { iteration: u64, norm: f64 },
    /// A saved solver state that does not fit the current parameters.
    #[error("solver state: {0}")]
    State(String),
    /// An error from libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// An error from libtorch's multi-tensor operators (src/optim_shim.cpp).
    #[error("optimizer tensor operation: {0}")]
    Tensor(String),
}
