pub mod rl;
