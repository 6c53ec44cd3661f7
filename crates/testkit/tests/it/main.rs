//! Tests of testkit's own helpers against the real things they drive.

mod pg;
mod slurm;
