package sqlretry

// ClassifyAnswer exposes the classification of a statement's error to the
// external tests (sqlretrytest_shapes_test.go).
var ClassifyAnswer = classifyAnswer
