DROP TABLE IF EXISTS {{product}};
CREATE TABLE {{product}} AS SELECT * FROM raw WHERE value > 0;
