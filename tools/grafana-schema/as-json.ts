// @grafana/schema types enum-valued fields (ThresholdsMode, FieldColorModeId, MappingType, ...) as
// TypeScript string enums, which accept only enum members, never the plain strings that dashboard
// JSON holds. AsJson<T> swaps every string enum for the union of its values and leaves everything
// else alone: required keys, number/boolean types and excess-key checks stay as strict as in T.
export type AsJson<T> = T extends string
  ? string extends T
    ? string
    : `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<AsJson<U>>
      : T extends object
        ? { [K in keyof T]: AsJson<T[K]> }
        : T;
