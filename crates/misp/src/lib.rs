pub mod objective;
